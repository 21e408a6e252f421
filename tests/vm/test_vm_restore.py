"""`surepoint vm restore NAME:latest --to DIR --start`: recreate the test VM from a backup and boot the copy."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.qmp import QmpConnection
from tests.conftest import Cli

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_surepoint_bitmaps")]

BOOT_TIMEOUT = 300  # TCG here: a boot takes 20-30 s alone, more with the original VM running beside it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _quit(workdir: Path, pid: int | None) -> None:
    """QMP quit of the restored VM; SIGKILL (its pid only) if it does not go."""
    with contextlib.suppress(Exception), QmpConnection(str(workdir / "qmp.sock"), timeout=10) as qmp:
        qmp.execute("quit")
    if pid is None:
        return
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_restore_and_boot_the_vm(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    marker = secrets.token_hex(16).encode()
    with test_vm.agent() as ga:
        ga.write_file("/data/restore-marker", marker)
        ga.exec(["sync"], check=True)
    backup = cli.run("backup", "vm", test_vm.name, "--json", check=True).json()["vms"][0]
    assert backup["consistency"] == "filesystem", backup
    point = cli.run("show", f"{test_vm.name}:latest", "--json", check=True).json()
    assert point["id"] == backup["restore_point"]

    # the root filesystem as backed up is clean (raw restore of the same disk, checked before any boot)
    root_number = next(d["number"] for d in point["disks"] if d["name"] == "root")
    root_raw = tmp_path / "root.raw"
    cli.run("restore", point["id"], "--disk", str(root_number), "--to", str(root_raw), check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(root_raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    root_raw.unlink()

    target = tmp_path / "restored"
    pid = None
    started = time.monotonic()
    try:
        result = cli.run(
            "vm",
            "restore",
            f"{test_vm.name}:latest",
            "--to",
            str(target),
            "--start",
            "--boot-timeout",
            str(BOOT_TIMEOUT),
            "--json",
            timeout=BOOT_TIMEOUT + 300,
        )
        restore_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        restored = result.json()
        pid = restored.get("pid")
        assert restored["restore_point"] == point["id"]
        assert [Path(p).suffix for p in restored["disks"]] == [".qcow2"] * len(point["disks"])
        assert all(Path(p).parent == target for p in restored["disks"])
        argv = restored["argv"]
        assert argv[argv.index("-name") + 1] == f"{test_vm.name}-restored"
        assert not any(str(test_vm.workdir) in a for a in argv), argv  # no socket or disk of the original
        assert (target / "start-vm.sh").exists()
        assert restored["guest_agent"] == str(target / "qga0.sock")
        assert _alive(pid)

        with GuestAgent(restored["guest_agent"], timeout=30) as ga:
            ga.ping()
            assert ga.exec(["hostname"], check=True).stdout.strip() == b"surepoint-test"
            assert ga.read_file("/data/restore-marker") == marker  # the data disk came back too
            assert ga.fsfreeze_status() == "thawed"
        print(
            f"\nrestore of {len(point['disks'])} disks to qcow2 and boot: {restore_seconds:.1f} s "
            f"(guest agent answered {restored['boot_seconds']:.1f} s after QEMU started)"
        )
    finally:
        _quit(target, pid)
    assert pid is None or not _alive(pid)
    for disk in restored["disks"]:
        check = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    test_vm.run(["rm", "-f", "/data/restore-marker"])
