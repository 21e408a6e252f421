"""A hand-run VM (`-daemonize -pidfile F`, -drive, a VNC display) restored and started with `vm restore --start`,
its start script daemonizing as the original did; single disks restored into the stopped original.

The VM has no operating system (its BIOS finds nothing to boot): enough for QEMU, QMP and the disks,
without the cost of booting a guest."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from surepoint.vm.qmp import QmpConnection
from tests.conftest import Cli

QEMU = "qemu-system-x86_64"
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU}")]
MiB = 1 << 20


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop(qmp_path: Path, pid: int | None) -> None:
    with contextlib.suppress(Exception), QmpConnection(str(qmp_path), timeout=10) as qmp:
        qmp.execute("quit")
    if pid is None:
        return
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _raw(image: Path) -> bytes:
    out = image.with_suffix(".check.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def test_daemonizing_vm_restores_and_starts(cli: Cli, tmp_path: Path) -> None:
    name = f"sp-daemon-{os.getpid()}"
    orig = tmp_path / "orig"
    orig.mkdir()
    content = os.urandom(2 * MiB) + bytes(14 * MiB)
    (orig / "disk.raw").write_bytes(content)
    disk = orig / "web.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(orig / "disk.raw"), str(disk)], check=True)
    argv = [
        QEMU, "-name", name, "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
        "-drive", f"file={disk},format=qcow2,if=virtio,cache=writeback",
        "-qmp", f"unix:{orig}/qmp.sock,server,nowait",
        "-vnc", "unix:" + str(orig / "vnc.sock"),
        "-pidfile", str(orig / "web.pid"), "-daemonize",
    ]  # fmt: skip
    subprocess.run(argv, check=True, timeout=60)  # the parent exits once the VM runs
    orig_pid = int((orig / "web.pid").read_text())
    restored_pid = None
    target = tmp_path / "restored"
    try:
        cli.run("init", check=True)
        backup = cli.run("vm", "backup", name, "--json", timeout=300)
        assert backup.returncode == 0, backup.stdout + backup.stderr
        [vm] = backup.json()["vms"]
        assert vm["status"] in ("ok", "warning") and vm["consistency"] == "crash", vm  # no guest agent

        for bad, message in (
            ([], "give --to DIR"),
            (["--to", str(tmp_path / "x"), "--network", "wifi"], "network 'wifi'"),
            (["--to", str(tmp_path / "x"), "--as", "xen"], "--as must be libvirt or qemu"),
            (["--to", str(tmp_path / "x"), "--as", "libvirt"], "has no libvirt domain XML"),
            (["--disk", "nosuch"], "has no disk 'nosuch'"),
            (["--disk", "0", "--start"], "--disk restores into an existing VM"),
        ):
            refused = cli.run("vm", "restore", f"{name}:latest", *bad)
            assert refused.returncode == 2 and message in refused.stderr, (bad, refused.stderr)
        result = cli.run("vm", "restore", f"{name}:latest", "--to", str(target), "--start", "--json", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        restored = result.json()
        restored_pid = restored["pid"]
        assert restored["started"] and _alive(restored_pid)  # QEMU itself, not a parent that exited
        assert restored["name"] == f"{name}-restored" and restored["kind"] == "qemu"
        assert "-daemonize" not in restored["argv"]
        assert restored["argv"][restored["argv"].index("-pidfile") + 1] == str(target / "qemu.pid")
        [image] = restored["disks"]
        assert _raw(Path(image)) == content
        with QmpConnection(str(target / "qmp.sock")) as qmp:
            assert qmp.execute("query-name")["name"] == f"{name}-restored"
            [block] = [b for b in qmp.execute("query-block") if b.get("inserted")]
            assert block["inserted"]["file"] == image
        assert int((target / "qemu.pid").read_text()) == restored_pid
        _stop(target / "qmp.sock", restored_pid)
        taken = cli.run("vm", "restore", f"{name}:latest", "--to", str(target))
        assert taken.returncode == 2 and "exists" in taken.stderr  # never over the images of a restore

        # the start script daemonizes, as the original did: it returns at once, the VM runs on
        script = (target / "start-vm.sh").read_text()
        assert "-daemonize" in script and str(orig) not in script
        subprocess.run([str(target / "start-vm.sh")], check=True, timeout=60)
        restored_pid = int((target / "qemu.pid").read_text())
        assert _alive(restored_pid)
        with QmpConnection(str(target / "qmp.sock")) as qmp:
            assert qmp.execute("query-name")["name"] == f"{name}-restored"
        _stop(target / "qmp.sock", restored_pid)
        restored_pid = None

        # single disks go back into the original only when it is stopped
        disk_name = cli.run("show", f"{name}:latest", "--json", check=True).json()["disks"][0]["name"]
        busy = cli.run("vm", "restore", f"{name}:latest", "--disk", disk_name)
        assert busy.returncode == 2 and "is running" in busy.stderr, busy.stderr
        _stop(orig / "qmp.sock", orig_pid)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)  # "lost" data
        back = cli.run("vm", "restore", f"{name}:latest", "--disk", disk_name, "--json")
        assert back.returncode == 0, back.stderr
        assert back.json()["disks"][0]["path"] == str(disk) and back.json()["disks"][0]["format"] == "qcow2"
        assert _raw(disk) == content
    finally:
        if restored_pid is not None:
            _stop(target / "qmp.sock", restored_pid)
        _stop(orig / "qmp.sock", orig_pid)
