"""Failover without a guest: overlays on a replica point made with qemu-img, the rewritten command
line, the record's states, a boot that fails, and the command line's answers to bad requests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from surepoint.errors import InvalidArgument, TargetError
from surepoint.processes import process_start
from surepoint.replica import images
from surepoint.replica.errors import ReplicaPointNotFound, ReplicaStateError
from surepoint.replica.failover import (
    boot_argv,
    boot_spec,
    failover,
    make_overlays,
    make_permanent,
    parse_replica_ref,
    undo_failover,
)
from surepoint.replica.layout import ReplicaDir, ReplicaPoint, SourceConfig, SourceDisk
from surepoint.replica.netmap import NetworkRule, apply_network
from tests.conftest import Cli

MIB = 1 << 20
SIZE = 8 * MIB
DEVICES = ("root", "data")


def qemu_io(path: str, command: str, fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, path], check=True, capture_output=True)


def read_disk(path: str) -> bytes:
    raw = f"{path}.read.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
    try:
        return Path(raw).read_bytes()
    finally:
        os.unlink(raw)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_argv(disks: dict[str, str]) -> list[str]:
    """A source VM's command line as a backup or replication saves it."""
    argv = ["qemu-system-x86_64", "-name", "web", "-machine", "q35", "-nodefaults", "-daemonize"]
    argv += ["-qmp", "unix:/run/web/qmp.sock,server=on,wait=off"]
    argv += ["-chardev", "socket,id=qga0,path=/run/web/qga.sock,server=on,wait=off"]
    argv += ["-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    argv += [
        "-netdev",
        "user,id=net0,hostfwd=tcp::2222-:22",
        "-device",
        "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01",
    ]
    for slot, (device, path) in enumerate(disks.items(), start=4):
        argv += ["-blockdev", f"driver=qcow2,node-name={device},file.driver=file,file.filename={path}"]
        argv += ["-device", f"virtio-blk-pci,drive={device},addr={slot:#x}"]
    return argv


def make_replica(tmp_path: Path, points: int = 2) -> tuple[ReplicaDir, dict[str, str]]:
    """A source VM's disks (MiB n holds byte n after cycle n) and its replica with `points` points,
    built like replication does: a base, then one overlay per cycle."""
    originals = {}
    (tmp_path / "vm").mkdir()
    for device in DEVICES:
        path = str(tmp_path / "vm" / f"{device}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)], check=True)
        originals[device] = path
    source = SourceConfig(saved_argv(originals), None, [SourceDisk(d, SIZE, originals[d]) for d in DEVICES])
    target = tmp_path / "site"
    target.mkdir()
    replica = ReplicaDir.create(str(target / "web-replica"), "web", source)
    with replica:
        for n in range(1, points + 1):
            files = {}
            for device in DEVICES:
                qemu_io(originals[device], f"write -P {n} {n * MIB} {MIB}")
                rel = replica.disk_path(device, None if n == 1 else f"p{n}")
                path = os.path.join(replica.path, rel)
                latest = replica.latest
                images.create(path, SIZE, backing=None if latest is None else os.path.basename(latest.files[device]))
                qemu_io(path, f"write -P {n} {n * MIB} {MIB}")
                files[device] = rel
            replica.add_point(ReplicaPoint(f"p{n}", f"2026-11-30T10:0{n}:00.000000Z", "filesystem", files))
    return replica, originals


def expected(upto: int) -> bytes:
    disk = bytearray(SIZE)
    for n in range(1, upto + 1):
        disk[n * MIB : (n + 1) * MIB] = bytes([n]) * MIB
    return bytes(disk)


def replica_files(replica: ReplicaDir) -> dict[str, str]:
    disks = os.path.join(replica.path, "disks")
    return {name: digest(os.path.join(disks, name)) for name in sorted(os.listdir(disks))}


def test_overlays_read_the_chosen_point_and_never_write_the_replica(tmp_path):
    replica, _ = make_replica(tmp_path, points=3)
    before = replica_files(replica)
    spec = boot_spec(replica, "p2")
    assert spec.point == "p2" and [d["device"] for d in spec.disks] == list(DEVICES)
    overlays = make_overlays(spec, str(tmp_path / "fo"))
    for overlay in overlays:
        assert read_disk(overlay) == expected(2)  # not point 3
        assert os.stat(overlay).st_mode & 0o777 == 0o600
        qemu_io(overlay, f"write -P 200 0 {2 * MIB}")  # the failover VM writes
        assert read_disk(overlay)[: 2 * MIB] == bytes([200]) * 2 * MIB
    assert replica_files(replica) == before
    assert read_disk(replica.chain_files("p2", "root")) == expected(2)


def test_points_by_time_and_missing_points(tmp_path):
    replica, _ = make_replica(tmp_path, points=3)
    assert boot_spec(replica, "2026-11-30T10:02:30Z").point == "p2"
    assert boot_spec(replica, "latest").point == "p3"
    with pytest.raises(ReplicaPointNotFound):
        boot_spec(replica, "nosuchpoint")
    with pytest.raises(ReplicaPointNotFound):
        boot_spec(replica, "2026-11-30T09:00:00Z")


def test_the_command_line_runs_on_the_overlays_with_its_own_sockets(tmp_path):
    replica, originals = make_replica(tmp_path)
    spec = boot_spec(replica)
    workdir = str(tmp_path / "fo")
    overlays = make_overlays(spec, workdir)
    argv = boot_argv(spec, overlays, workdir, "web-replica")
    text = " ".join(argv)
    assert "-daemonize" not in argv
    assert all(o in text for o in overlays) and not any(p in text for p in originals.values())
    assert argv[argv.index("-name") + 1] == "web-replica"
    assert f"unix:{workdir}/qmp.sock" in text and f"path={workdir}/qga0.sock" in text
    assert "/run/web" not in text


def test_network_mapping(tmp_path):
    argv = ["qemu", "-netdev", "user,id=net0,hostfwd=tcp::2222-:22"]
    argv += ["-device", "virtio-net-pci,netdev=net0,addr=0x3,mac=52:54:00:00:00:01"]
    argv += ["-netdev", '{"type": "tap", "id": "net1", "fd": "3"}', "-device", "e1000,netdev=net1", "-m", "1024"]
    mapped = apply_network(argv, [NetworkRule.parse("net0=bridge:br-dr"), NetworkRule.parse("net1=none")])
    assert mapped == [
        "qemu",
        "-netdev",
        "bridge,id=net0,br=br-dr",
        "-device",
        "virtio-net-pci,netdev=net0,addr=0x3,mac=52:54:00:00:00:01",  # the NIC as it was
        "-device",
        "e1000",  # unplugged: no backend
        "-m",
        "1024",
    ]
    one = apply_network(argv, [NetworkRule.parse("net0=tap:tap7")])
    assert one[2] == "tap,id=net0,ifname=tap7,script=no,downscript=no" and one[5:] == argv[5:]
    assert json.loads(apply_network(argv, [NetworkRule.parse("user")])[6]) == {"type": "user", "id": "net1"}
    with pytest.raises(InvalidArgument, match="two network backends"):
        apply_network(argv, [NetworkRule.parse("tap:tap7")])
    with pytest.raises(InvalidArgument, match="net9"):
        apply_network(argv, [NetworkRule.parse("net9=user")])
    with pytest.raises(InvalidArgument):
        NetworkRule.parse("net0=bridge")
    with pytest.raises(InvalidArgument):
        NetworkRule.parse("wifi")


def test_replica_refs():
    assert parse_replica_ref("replica:/srv/site/web-replica@p2") == ("/srv/site/web-replica", "p2")
    assert parse_replica_ref("replica:/srv/site/web-replica") == ("/srv/site/web-replica", "latest")
    with pytest.raises(InvalidArgument):
        parse_replica_ref("web:latest")


def test_a_boot_that_fails_leaves_the_replica_ready(tmp_path):
    replica, _ = make_replica(tmp_path)
    with replica:
        replica.source.argv.insert(1, "-no-such-option")  # QEMU refuses it at once
        replica.save()
    before = replica_files(replica)
    with pytest.raises(TargetError, match="QEMU exited"):
        failover(replica, "p1", boot_timeout=30)
    again = ReplicaDir.open(replica.path)
    assert again.state == "ready" and again.failover is None
    assert [n for n in os.listdir(os.path.join(replica.path, "failover")) if n.endswith(".qcow2")] == []
    assert replica_files(replica) == before
    with pytest.raises(ReplicaStateError, match="not failed over"):
        undo_failover(again)


def test_bad_requests_on_the_command_line(tmp_path):
    replica, _ = make_replica(tmp_path)
    target = os.path.dirname(replica.path)
    cli = Cli(tmp_path)
    r = cli.run("failover", "nosuchvm", "--target", target)
    assert r.returncode == 1 and "VM nosuchvm has no replica in" in r.stderr, r.stderr
    r = cli.run("failover", "web", "--target", target, "--point", "zzz")
    assert r.returncode == 2 and "has no point 'zzz'" in r.stderr, r.stderr
    r = cli.run("failover", "web", "--target", target, "--undo")
    assert r.returncode == 2 and "it is not failed over" in r.stderr, r.stderr
    r = cli.run("failback", "web", "--target", target)
    assert r.returncode == 2 and "cannot fail back web: it is not failed over" in r.stderr, r.stderr
    r = cli.run("failover", "web", "--target", target, "--undo", "--permanent")
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r = cli.run("failover", "web")
    assert r.returncode == 2 and "--target" in r.stderr
    with replica:
        replica.state = "failed-over"
        replica.failover = {"point": "p1", "time": "2026-11-30T11:00:00Z", "pid": None}
        replica.save()
    r = cli.run("failover", "web", "--target", target)
    assert r.returncode == 2 and "failed over already (point p1" in r.stderr, r.stderr
    with replica:
        replica.state = "permanent"
        replica.save()
    r = cli.run("failover", "web", "--target", target, "--undo")
    assert r.returncode == 2 and "became the production VM" in r.stderr, r.stderr


def run_on_overlays(replica: ReplicaDir, point: str, workdir: Path) -> dict:
    """A QEMU with no guest (machine none) holding the failover overlays open, recorded as a failover."""
    spec = boot_spec(replica, point)
    overlays = make_overlays(spec, os.path.join(replica.path, "failover"))
    qmp = str(workdir / "qmp.sock")
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    for n, overlay in enumerate(overlays):
        argv += ["-drive", f"file={overlay},format=qcow2,if=none,id=disk{n}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(qmp):
        assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.1)
    entry = {
        "point": point,
        "name": "web-replica",
        "overlays": {d["device"]: o for d, o in zip(spec.disks, overlays, strict=True)},
        "argv": argv,
        "qmp": qmp,
        "guest_agent": None,
        "pid": proc.pid,
        "pid_start": process_start(proc.pid),
    }
    with replica:
        replica.state = "failed-over"
        replica.failover = entry
        replica.save()
    return {"proc": proc, **entry}


def test_permanent_streams_the_chain_into_the_running_disks(tmp_path):
    replica, _ = make_replica(tmp_path, points=3)
    running = run_on_overlays(replica, "p2", tmp_path)
    try:
        permanent = make_permanent(ReplicaDir.open(replica.path))
        assert running["proc"].poll() is None  # the VM never stopped
        for overlay in running["overlays"].values():
            info = json.loads(
                subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay], capture_output=True).stdout
            )
            assert "backing-filename" not in info
            assert read_disk(overlay) == expected(2)
        assert os.listdir(os.path.join(replica.path, "disks")) == []
        again = ReplicaDir.open(replica.path)
        assert again.state == "permanent" and again.points == []
        assert again.extra["permanent"]["disks"] == running["overlays"]
        script = Path(permanent["start_script"]).read_text()
        assert all(o in script for o in running["overlays"].values())
        with pytest.raises(ReplicaStateError, match="production VM"):
            failover(again)
    finally:
        running["proc"].kill()
        running["proc"].wait()


def test_undo_stops_the_vm_and_drops_its_writes(tmp_path):
    replica, _ = make_replica(tmp_path, points=2)
    before = replica_files(replica)
    running = run_on_overlays(replica, "p1", tmp_path)
    try:
        entry = undo_failover(ReplicaDir.open(replica.path))
        assert entry["pid"] == running["pid"]
        assert running["proc"].wait(30) is not None  # quit through QMP
        assert not any(os.path.exists(o) for o in running["overlays"].values())
        assert ReplicaDir.open(replica.path).state == "ready"
        assert replica_files(replica) == before
    finally:
        if running["proc"].poll() is None:
            running["proc"].kill()
            running["proc"].wait()
