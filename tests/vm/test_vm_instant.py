"""`surepoint instant-recover`: boot the test VM straight from the repository, migrate it, or discard it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.qmp import QmpConnection
from tests.conftest import SUREPOINT, Cli
from tests.security.pause import Pause, last_line, paused_at

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_surepoint_bitmaps")]

BOOT_TIMEOUT = 300  # TCG here: a boot takes 20-30 s alone, more with the original VM running beside it


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _kill(pid: int | None) -> None:
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        _wait_gone(pid)  # type: ignore[arg-type]


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the repository with its size and mtime: what must not change."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _mount_points_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(directory) or p.startswith(str(directory) + "/")]


def _loops_on(directory: Path) -> list[str]:
    proc = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    devices = json.loads(proc.stdout or "{}").get("loopdevices", [])
    return [d["name"] for d in devices if str(directory) in (d.get("back-file") or "")]


def _qemu_processes_using(directory: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(directory).encode() in f.read() and _alive(int(entry)):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _assert_nothing_left(cli: Cli, workdir: Path, pid: int | None) -> None:
    assert not _alive(pid), f"QEMU {pid} still runs"
    assert _qemu_processes_using(workdir) == []
    assert _mount_points_under(workdir) == []
    assert _loops_on(workdir) == []
    assert list(workdir.glob("*.qcow2")) == []
    assert not (workdir / "instant.json").exists()
    mounts = cli.run("mounts", "--json", check=True).json()
    assert not any(m["dir"].startswith(str(workdir)) for m in mounts), mounts


@pytest.fixture(scope="module")
def vm_point(test_vm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict, bytes]]:
    """One backup of the test VM (in a repository of this module), with a marker file on its data disk."""
    cli = Cli(tmp_path_factory.mktemp("instant-repo"))
    cli.run("init", check=True)
    marker = secrets.token_hex(16).encode()
    with test_vm.agent() as ga:
        _wait_data_mounted(ga)
        ga.write_file("/data/instant-marker", marker)
        ga.exec(["sync"], check=True)
    backup = cli.run("backup", "vm", test_vm.name, "--json", check=True).json()["vms"][0]
    assert backup["consistency"] == "filesystem", backup
    point = cli.run("show", backup["restore_point"], "--json", check=True).json()
    yield cli, point, marker
    test_vm.run(["rm", "-f", "/data/instant-marker"])


def _wait_data_mounted(ga: GuestAgent, timeout: float = 120) -> None:
    """/data is mounted by systemd (nofail) and may come after the guest agent answers."""
    deadline = time.monotonic() + timeout
    while ga.exec(["mountpoint", "-q", "/data"]).exitcode != 0:
        assert time.monotonic() < deadline, "/data is not mounted in the guest"
        time.sleep(1)


def _quit(qmp_path: str, pid: int) -> None:
    with contextlib.suppress(Exception), QmpConnection(qmp_path, timeout=10) as qmp:
        qmp.execute("quit")
    _wait_gone(pid)


def _instant(cli: Cli, *args: str, timeout: float = BOOT_TIMEOUT + 300):
    return cli.run("instant-recover", *args, timeout=timeout)


def test_instant_recover_then_migrate(test_vm, vm_point, tmp_path: Path) -> None:
    cli, point, marker = vm_point
    workdir = tmp_path / "instant"
    target = tmp_path / "production"
    before = _listing(cli.repo)
    pid = None
    migrated = False
    try:
        started = time.monotonic()
        result = _instant(cli, point["id"], "--workdir", str(workdir), "--boot-timeout", str(BOOT_TIMEOUT), "--json")
        command_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        session = result.json()
        pid = session["pid"]
        print(
            f"\ninstant recovery: guest agent answered {session['total_seconds']:.1f} s after the command started "
            f"(QEMU boot {session['boot_seconds']:.1f} s; command returned after {command_seconds:.1f} s)"
        )
        assert session["status"] == "running" and session["alive"]
        assert _alive(pid)
        argv = session["argv"]
        assert argv[argv.index("-name") + 1] == f"{test_vm.name}-instant"
        assert not any(str(test_vm.workdir) in a for a in argv), argv
        overlays = [Path(o["overlay"]) for o in session["overlays"]]
        assert [o.parent for o in overlays] == [workdir] * len(point["disks"])
        for entry in session["overlays"]:
            info = json.loads(
                subprocess.run(
                    ["qemu-img", "info", "-U", "--output=json", entry["overlay"]],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            assert info["backing-filename"] == entry["image"]
            assert entry["image"].startswith(str(workdir / "repo-mount") + "/disks/")
        assert _mount_points_under(workdir) == [str(workdir / "repo-mount")]

        marker1 = secrets.token_hex(16).encode()
        with GuestAgent(session["guest_agent"], timeout=60) as ga:
            assert ga.exec(["hostname"], check=True).stdout.strip() == b"surepoint-test"
            _wait_data_mounted(ga)
            assert ga.read_file("/data/instant-marker") == marker  # the data disk is there too
            ga.write_file("/root/instant-1", marker1)
            ga.exec(["sync"], check=True)
        root_overlay = next(Path(o["overlay"]) for o in session["overlays"] if o["name"] == "root")
        used = subprocess.run(
            ["qemu-img", "map", "-U", "--output=json", str(root_overlay)], capture_output=True, text=True, check=True
        )
        assert any(e["depth"] == 0 and e["data"] for e in json.loads(used.stdout)), "no guest write in the overlay"
        now = _listing(cli.repo)
        changed = {name for name in now.keys() | before.keys() if now.get(name) != before.get(name)}
        # nothing changed but the reader lock that keeps forget and gc off the point while it runs
        assert changed and all(name.startswith("locks/") for name in changed), changed
        held = [json.loads((cli.repo / name).read_bytes()) for name in changed]
        assert all(point["id"] in lock.get("points", []) for lock in held), held
        verify = cli.run("verify", point["id"], timeout=600)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        started = time.monotonic()
        result = _instant(cli, "--workdir", str(workdir), "--migrate-to", str(target), "--json", timeout=1800)
        migrate_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        migrated = True
        after = result.json()
        print(f"migration to local qcow2 while running: {migrate_seconds:.1f} s")
        assert after["status"] == "migrated" and after["pid"] == pid and _alive(pid)
        disks = [Path(d) for d in after["disks"]]
        assert [d.parent for d in disks] == [target] * len(point["disks"])
        assert all(d.exists() for d in disks)
        assert not any(o.exists() for o in overlays)
        assert _mount_points_under(workdir) == []  # the repository is no longer used
        assert not any(m["dir"].startswith(str(workdir)) for m in cli.run("mounts", "--json", check=True).json())
        with QmpConnection(after["qmp"]) as qmp:
            files = sorted(d.filename for d in qmp.block_devices())
            nodes = [n.get("file", "") for n in qmp.query_named_block_nodes()]
        assert files == sorted(str(d) for d in disks), files
        assert not any(str(workdir) in n for n in nodes), nodes
        assert (target / "start-vm.sh").exists()

        marker2 = secrets.token_hex(16).encode()
        with GuestAgent(session["guest_agent"], timeout=60) as ga:
            assert ga.read_file("/root/instant-1") == marker1  # written before the migration
            ga.write_file("/root/instant-2", marker2)
            ga.exec(["sync"], check=True)
        _quit(after["qmp"], pid)
        assert not _alive(pid)

        root = next(d for d in disks if d.name.endswith("-root.qcow2"))
        info = json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", str(root)], capture_output=True, check=True).stdout
        )
        # 2 GiB disk, about 830 MiB used: zeros must not have been copied as data
        assert info["actual-size"] < 0.75 * info["virtual-size"], info
        check = subprocess.run(["qemu-img", "check", str(root)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        raw = tmp_path / "root.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(root), str(raw)], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        for name, expected in (("instant-1", marker1), ("instant-2", marker2)):
            cat = subprocess.run(["debugfs", "-R", f"cat /root/{name}", str(raw)], capture_output=True, check=True)
            assert cat.stdout == expected, name
        raw.unlink()
        assert _listing(cli.repo) == before, "the repository changed"
    finally:
        if not migrated:
            _instant(cli, "--workdir", str(workdir), "--discard", timeout=120)
        _kill(pid)
    assert _mount_points_under(workdir) == []


def test_instant_recover_discard_and_errors(vm_point, tmp_path: Path) -> None:
    cli, point, _marker = vm_point
    workdir = tmp_path / "instant"
    pid = None
    try:
        # not a VM restore point
        image = tmp_path / "plain.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        plain = cli.run("backup", str(image), "--name", "plain-disk", "--json", check=True).json()
        result = _instant(cli, plain["id"], "--workdir", str(tmp_path / "plain"))
        assert result.returncode == 2 and "not a VM backup" in result.stderr, result.stderr

        result = _instant(cli, point["id"], "--workdir", str(workdir), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        session = result.json()
        pid = session["pid"]
        assert _alive(pid) and list(workdir.glob("*.qcow2"))
        again = _instant(cli, point["id"], "--workdir", str(workdir))
        assert again.returncode == 2 and "in use" in again.stderr, again.stderr
        assert _alive(pid)

        result = _instant(cli, "--workdir", str(workdir), "--discard")
        assert result.returncode == 0, result.stdout + result.stderr
        _assert_nothing_left(cli, workdir, pid)

        # a crashed session: QEMU killed; migration refuses, --discard cleans
        result = _instant(cli, point["id"], "--workdir", str(workdir), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        pid = result.json()["pid"]
        _kill(pid)
        gone = _instant(cli, "--workdir", str(workdir), "--migrate-to", str(tmp_path / "target"))
        assert gone.returncode != 0 and "is gone" in gone.stderr, gone.stderr
        crashed = _instant(cli, point["id"], "--workdir", str(workdir))
        assert crashed.returncode == 2 and "crashed" in crashed.stderr, crashed.stderr
        result = _instant(cli, "--workdir", str(workdir), "--discard")
        assert result.returncode == 0, result.stdout + result.stderr
        _assert_nothing_left(cli, workdir, pid)
    finally:
        if (workdir / "instant.json").exists():
            _instant(cli, "--workdir", str(workdir), "--discard", timeout=120)
        _kill(pid)


def test_an_interrupted_instant_recovery_leaves_nothing(vm_point, tmp_path: Path) -> None:
    """SIGTERM while the instant VM boots (QEMU started, its agent not yet answering): one line says
    nothing was left running, and nothing is: no QEMU, mount, loop device, overlay or lock."""
    cli, point, _marker = vm_point
    workdir = tmp_path / "instant"
    pause = Pause(tmp_path / "pause", "instant-booting")
    argv = [SUREPOINT, "instant-recover", point["id"], "--workdir", str(workdir)]
    pid = None
    try:
        with paused_at(pause, argv, cli.env, timeout=BOOT_TIMEOUT) as proc:
            pid = json.loads((workdir / "instant.json").read_text())["pid"]
            assert _alive(pid), "QEMU should be running at this checkpoint"
            os.kill(proc.pid, signal.SIGTERM)
            _out, err = proc.communicate(timeout=120)
    finally:
        _kill(pid)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    assert last_line(err).startswith("error: interrupted by SIGTERM: no instant VM was left running"), err
    _assert_nothing_left(cli, workdir, pid)
    assert [p for p in (cli.repo / "locks").iterdir() if not p.name.endswith(".tmp")] == []
