"""The replica directory: its record, points, chains, retention and folds, with real qcow2 files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from surepoint.replica import images
from surepoint.replica.errors import (
    NotAReplica,
    ReplicaLocked,
    ReplicaNotFound,
    ReplicaOfAnotherVm,
    ReplicaPointNotFound,
)
from surepoint.replica.layout import ReplicaDir, ReplicaPoint, SourceConfig, SourceDisk

MIB = 1 << 20
SIZE = 8 * MIB
DEVICES = ("root", "data")


def source() -> SourceConfig:
    return SourceConfig(argv=["qemu-system-x86_64", "-name", "web"], disks=[SourceDisk(d, SIZE) for d in DEVICES])


def qemu_io(path: str, command: str) -> bytes:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], check=True, capture_output=True).stdout


def read_disk(path: str) -> bytes:
    raw = f"{path}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, raw], check=True)
    try:
        with open(raw, "rb") as f:
            return f.read()
    finally:
        os.unlink(raw)


def cycle(replica: ReplicaDir, n: int, time: str | None = None) -> ReplicaPoint:
    """One cycle: write MiB number n of every disk with the byte n, commit a point."""
    point_id = f"p{n:03d}"
    files = {}
    latest = replica.latest
    for device in DEVICES:
        rel = replica.disk_path(device, None if latest is None else point_id)
        path = os.path.join(replica.path, rel)
        if latest is None:
            images.create(path, SIZE)
        else:
            images.create(path, SIZE, backing=os.path.basename(latest.files[device]))
        qemu_io(path, f"write -P {n} {n * MIB} {MIB}")
        files[device] = rel
    point = ReplicaPoint(point_id, time or f"2026-11-30T10:{n:02d}:00.000000Z", "filesystem", files)
    replica.add_point(point)
    return point


def expected(upto: int, since: int = 0) -> bytes:
    disk = bytearray(SIZE)
    for n in range(since, upto + 1):
        disk[n * MIB : (n + 1) * MIB] = bytes([n]) * MIB
    return bytes(disk)


@pytest.fixture
def replica(tmp_path):
    r = ReplicaDir.create(str(tmp_path / "web-replica"), "web", source())
    r.lock()
    yield r
    r.unlock()


def test_create_is_private_and_reopens(replica, tmp_path):
    assert os.stat(replica.path).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(replica.path, "replica.json")).st_mode & 0o777 == 0o600
    again = ReplicaDir.open(replica.path)
    assert again.vm == "web" and again.points == [] and again.state == "ready"
    assert again.source.devices() == list(DEVICES)


def test_other_vm_and_foreign_directories_are_refused(replica, tmp_path):
    with pytest.raises(ReplicaOfAnotherVm):
        ReplicaDir.create(replica.path, "db", source())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(NotAReplica):
        ReplicaDir.create(str(tmp_path / "junk"), "web", source())
    with pytest.raises(NotAReplica):
        ReplicaDir.open(str(tmp_path / "junk"))
    with pytest.raises(ReplicaNotFound):
        ReplicaDir.open(str(tmp_path / "absent"))
    (tmp_path / "junk" / "replica.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(NotAReplica):
        ReplicaDir.open(str(tmp_path / "junk"))


def test_one_writer(replica):
    other = ReplicaDir.open(replica.path)
    with pytest.raises(ReplicaLocked):
        other.lock()
    replica.unlock()
    other.lock()
    other.unlock()
    unlocked = ReplicaDir.open(replica.path)
    with pytest.raises(ReplicaLocked):
        unlocked.apply_retention(1)


def test_points_by_id_prefix_latest_and_time(replica):
    for n in range(1, 4):
        cycle(replica, n)
    assert replica.point("latest").id == "p003"
    assert replica.point("p002").id == "p002"
    assert replica.point("2026-11-30T10:02:30Z").id == "p002"
    assert replica.point("2026-11-30T12:00:00+00:00").id == "p003"
    with pytest.raises(ReplicaPointNotFound):
        replica.point("p00")  # ambiguous
    with pytest.raises(ReplicaPointNotFound):
        replica.point("2026-11-30T09:00:00Z")
    with pytest.raises(ReplicaPointNotFound):
        replica.point("nothing")


def test_every_point_reads_its_own_state(replica):
    for n in range(1, 5):
        cycle(replica, n)
    for n in range(1, 5):
        for device in DEVICES:
            assert read_disk(replica.chain_files(f"p{n:03d}", device)) == expected(n, since=1)
    # the overlay of a point holds just what that cycle wrote
    assert images.allocated_bytes(replica.chain_files("p003", "root")) == MIB


def test_retention_merges_into_the_base_and_keeps_states(replica):
    for n in range(1, 7):
        cycle(replica, n)
    dropped = replica.apply_retention(3)
    assert dropped == ["p001", "p002", "p003"]
    assert [p.id for p in replica.points] == ["p004", "p005", "p006"]
    assert replica.points[0].files["root"] == "disks/root.base.qcow2"
    for n in (4, 5, 6):
        assert read_disk(replica.chain_files(f"p{n:03d}", "data")) == expected(n, since=1)
    assert sorted(os.listdir(os.path.join(replica.path, "disks"))) == sorted(
        f"{d}.{p}.qcow2" for d in DEVICES for p in ("base", "p005", "p006")
    )
    assert ReplicaDir.open(replica.path).points == replica.points  # saved


def test_forget_a_middle_and_the_latest_point(replica):
    for n in range(1, 5):
        cycle(replica, n)
    replica.forget(["p002"])
    assert [p.id for p in replica.points] == ["p001", "p003", "p004"]
    assert read_disk(replica.chain_files("p003", "root")) == expected(3, since=1)
    assert read_disk(replica.chain_files("p004", "root")) == expected(4, since=1)
    assert not os.path.exists(os.path.join(replica.path, "disks", "root.p002.qcow2"))
    replica.forget(["p004"])
    assert replica.latest.id == "p003"
    assert replica.remove_unfinished() == []
    with pytest.raises(ReplicaPointNotFound):
        replica.forget(["p999"])


def test_an_unfinished_cycle_is_removed(replica):
    cycle(replica, 1)
    stray = os.path.join(replica.path, replica.disk_path("root", "p002"))
    images.create(stray, SIZE, backing="root.base.qcow2")
    assert replica.remove_unfinished() == ["disks/root.p002.qcow2"]
    assert read_disk(replica.chain_files("latest", "root")) == expected(1, since=1)


def test_an_unfinished_first_cycle_is_removed(replica):
    images.create(os.path.join(replica.path, replica.disk_path("root", None)), SIZE)
    assert replica.remove_unfinished() == ["disks/root.base.qcow2"]


def test_a_fold_cut_short_is_finished_by_the_next(replica, monkeypatch):
    for n in range(1, 5):
        cycle(replica, n)
    real_rebase = images.rebase_unsafe

    def die(*args):
        raise KeyboardInterrupt  # as if killed right after the merge, before the rebase

    monkeypatch.setattr(images, "rebase_unsafe", die)
    with pytest.raises(KeyboardInterrupt):
        replica.apply_retention(2)
    monkeypatch.setattr(images, "rebase_unsafe", real_rebase)
    replica.unlock()  # the writer died
    crashed = ReplicaDir.open(replica.path)  # what the next writer finds
    assert [p.id for p in crashed.points] == ["p003", "p004"]
    for n in (3, 4):
        assert read_disk(crashed.chain_files(f"p{n:03d}", "root")) == expected(n, since=1)
    crashed.lock()
    crashed.fold()
    crashed.remove_unfinished()
    assert crashed.points[0].files["root"] == "disks/root.base.qcow2"
    for n in (3, 4):
        assert read_disk(crashed.chain_files(f"p{n:03d}", "root")) == expected(n, since=1)
    assert len(os.listdir(os.path.join(replica.path, "disks"))) == 4
    crashed.unlock()


def test_a_disk_the_vm_no_longer_has_keeps_its_whole_chain(replica):
    for n in range(1, 4):
        cycle(replica, n)
    # the VM lost its data disk: the next point has only root
    rel = replica.disk_path("root", "p004")
    images.create(os.path.join(replica.path, rel), SIZE, backing=os.path.basename(replica.latest.files["root"]))
    qemu_io(os.path.join(replica.path, rel), f"write -P 4 {4 * MIB} {MIB}")
    replica.add_point(ReplicaPoint("p004", "2026-11-30T10:04:00.000000Z", "filesystem", {"root": rel}))
    assert replica.remove_unfinished() == []
    replica.forget(["p002"])  # its data overlay is under p003's, which the latest point no longer names
    for n in (1, 3):  # the older points still read their data disk, down to its base
        assert read_disk(replica.chain_files(f"p{n:03d}", "data")) == expected(n, since=1)
    assert read_disk(replica.chain_files("p004", "root")) == expected(4, since=1)
