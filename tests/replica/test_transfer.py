"""Replication cycles without a VM: blocks from a disk image in memory into a replica through a real
qemu-storage-daemon, in-process and through `surepoint replica receive` (the ssh protocol, minus ssh)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from surepoint.errors import SurepointError
from surepoint.jobs.replicate import BLOCK, Transfer, send_differences, send_extents
from surepoint.replica import images
from surepoint.replica.errors import ReplicaLocked, ReplicaOfAnotherVm, ReplicaWriteError
from surepoint.replica.layout import ReplicaDir
from surepoint.replica.protocol import RemoteSite
from surepoint.replica.site import LocalSite
from surepoint.repo.extents import Extent
from tests.remote.sshd import sshd  # noqa: F401 - the session fixture

MIB = 1 << 20
SIZE = 16 * MIB
SUREPOINT = shutil.which("surepoint") or os.path.join(os.path.dirname(sys.executable), "surepoint")


class Disk:
    """A source disk in memory."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytearray(size)
        self.size = size
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += length
        return bytes(self.data[offset : offset + length])

    def fill(self, offset: int, length: int, byte: int) -> Extent:
        self.data[offset : offset + length] = bytes([byte]) * length
        return Extent(offset, length)


SOURCE = {"argv": ["qemu-system-x86_64"], "libvirt_xml": None, "disks": [{"device": "vda", "virtual_size": SIZE}]}


def read_back(path: str) -> bytes:
    raw = f"{path}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, raw], check=True)
    try:
        with open(raw, "rb") as f:
            return f.read()
    finally:
        os.unlink(raw)


def cycle(site, disk: Disk, point: str, how, name: str = "web-replica") -> Transfer:
    session = site.session(name)
    try:
        session.open("web", SOURCE)
        session.begin(point, {"vda": disk.size})
        sent = Transfer()
        how(session, sent)
        session.commit({"time": "2026-11-30T10:00:00.000000Z", "consistency": "crash", "cbt": "test"}, 3)
    except BaseException:
        session.abort()
        raise
    finally:
        session.close()
    return sent


def full(disk):
    return lambda s, sent: send_extents(disk, s, "vda", [Extent(0, disk.size)], sent, first=True)


def changed(disk, extents):
    return lambda s, sent: send_extents(disk, s, "vda", extents, sent, first=False)


def compare(disk):
    return lambda s, sent: send_differences(disk, s, "vda", sent)


@pytest.fixture(params=["local", "receive"])
def site(request, tmp_path):
    root = str(tmp_path / "replicas")
    if request.param == "local":
        s = LocalSite(root)
    else:
        s = RemoteSite("ssh://replica-host/replicas", command=[SUREPOINT, "replica", "receive", root])
    s.root = root
    yield s
    s.close()


def latest_bytes(root: str) -> bytes:
    replica = ReplicaDir.open(os.path.join(root, "web-replica"))
    return read_back(replica.chain_files("latest", "vda"))


def test_first_cycle_is_thin_then_bitmap_and_checksum_cycles_send_changes(site):
    disk = Disk()
    disk.fill(0, 3 * MIB, 1)
    disk.fill(10 * MIB, 100_000, 2)  # ends inside a block
    sent = cycle(site, disk, "a1", full(disk))
    assert sent.sent_bytes == 3 * MIB + 2 * BLOCK  # zero blocks skipped
    assert latest_bytes(site.root) == bytes(disk.data)
    replica = ReplicaDir.open(os.path.join(site.root, "web-replica"))
    assert images.allocated_bytes(replica.chain_files("latest", "vda")) == sent.sent_bytes

    # a bitmap cycle: what the bitmap marks, including a range that became zeros
    marks = [disk.fill(5 * MIB, 200_000, 3), disk.fill(MIB, BLOCK, 0)]
    sent = cycle(site, disk, "a2", changed(disk, marks))
    assert sent.sent_bytes == 4 * BLOCK and sent.zeroed_bytes == BLOCK
    assert latest_bytes(site.root) == bytes(disk.data)

    # a checksum cycle finds the changed blocks by itself
    disk.fill(12 * MIB, 10, 4)
    disk.fill(2 * MIB, BLOCK, 0)
    sent = cycle(site, disk, "a3", compare(disk))
    assert sent.compared_bytes == SIZE
    assert (sent.sent_bytes, sent.zeroed_bytes) == (BLOCK, BLOCK)
    assert latest_bytes(site.root) == bytes(disk.data)

    # every kept point still reads as it was; the oldest is the base
    replica = ReplicaDir.open(os.path.join(site.root, "web-replica"))
    assert [p.id for p in replica.points] == ["a1", "a2", "a3"]
    assert [p.sent_bytes for p in replica.points] == [3 * MIB + 2 * BLOCK, 4 * BLOCK, BLOCK]
    cycle(site, disk, "a4", changed(disk, []))
    listed = site.list()
    assert [p["id"] for p in listed[0]["points"]] == ["a2", "a3", "a4"]
    assert listed[0]["points"][0]["bytes"] > 3 * MIB  # the base holds the whole oldest state


def test_an_aborted_cycle_leaves_the_last_point(site):
    disk = Disk()
    disk.fill(0, MIB, 1)
    cycle(site, disk, "b1", full(disk))
    before = bytes(disk.data)
    disk.fill(0, MIB, 9)

    def fail_midway(session, sent):
        send_extents(disk, session, "vda", [Extent(0, MIB)], sent, first=False)
        raise RuntimeError("connection cut")

    with pytest.raises(RuntimeError):
        cycle(site, disk, "b2", fail_midway)
    assert latest_bytes(site.root) == before
    assert sorted(os.listdir(os.path.join(site.root, "web-replica", "disks"))) == ["vda.base.qcow2"]


def test_a_replica_of_another_vm_is_refused(site):
    disk = Disk()
    cycle(site, disk, "c1", full(disk))
    session = site.session("web-replica")
    with pytest.raises(ReplicaOfAnotherVm, match="replica of VM 'web'"):
        session.open("db", SOURCE)
    session.close()


def test_receiver_killed_mid_cycle(tmp_path):
    root = str(tmp_path / "replicas")
    site = RemoteSite("ssh://h/replicas", command=[SUREPOINT, "replica", "receive", root])
    disk = Disk()
    disk.fill(0, 2 * MIB, 1)
    cycle(site, disk, "d1", full(disk))
    session = site.session("web-replica")
    session.open("web", SOURCE)
    session.begin("d2", {"vda": SIZE})
    session.write("vda", 0, bytes([7]) * MIB)
    session.checksums("vda", 0, BLOCK, BLOCK)  # the write has arrived
    os.kill(session.conn.proc.pid, signal.SIGKILL)
    session.conn.proc.wait()
    with pytest.raises(SurepointError, match="lost the connection"):
        session.commit({"time": "2026-11-30T10:00:00.000000Z", "consistency": "crash"}, 3)
    session.close()
    # the storage daemon died with it: nothing holds the replica's files, and the next cycle completes
    assert latest_bytes(root) == bytes(disk.data)
    disk.fill(0, MIB, 5)
    sent = cycle(site, disk, "d3", compare(disk))
    assert sent.sent_bytes == MIB
    assert latest_bytes(root) == bytes(disk.data)
    assert sorted(os.listdir(os.path.join(root, "web-replica", "disks"))) == ["vda.base.qcow2", "vda.d3.qcow2"]


@pytest.mark.root
def test_target_disk_full(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        site = LocalSite(str(mount))
        disk = Disk()
        disk.fill(0, 2 * MIB, 1)
        cycle(site, disk, "e1", full(disk))
        before = bytes(disk.data)
        disk.fill(4 * MIB, 8 * MIB, 2)
        with pytest.raises(ReplicaWriteError, match="space"):
            cycle(site, disk, "e2", changed(disk, [Extent(4 * MIB, 8 * MIB)]))
        replica = ReplicaDir.open(str(mount / "web-replica"))
        assert [p.id for p in replica.points] == ["e1"]
        assert read_back(replica.chain_files("latest", "vda")) == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_seed_from_a_backup_then_send_changes(site, tmp_path):
    from surepoint import storage
    from surepoint.repo.backup import BackupRequest, run_backup
    from surepoint.repo.repository import Repository
    from tests.repo.conftest import MemoryDisk

    disk = Disk()
    disk.fill(0, 3 * MIB, 1)
    repo_path = str(tmp_path / "repo")
    repo = Repository.create(storage.open(repo_path, create=True), chunk_size=64 << 10)
    backup = MemoryDisk(bytes(disk.data), name="vda")
    point = run_backup(repo, BackupRequest(name="web", sources=[backup], metadata={"vm": {"bitmap": "bm-1"}}))

    disk.fill(MIB, BLOCK, 2)  # the VM moved on since the backup
    session = site.session("web-replica")
    session.open("web", SOURCE)
    session.begin("s1", {"vda": SIZE})
    seeded = session.seed_from(repo_path, point.id, ["vda"], lambda: "")
    assert seeded == {"restore_point": point.id, "bitmap": "bm-1", "seeded": ["vda"]}
    sent = Transfer()
    send_differences(disk, session, "vda", sent)
    session.commit({"time": "2026-11-30T10:00:00.000000Z", "consistency": "crash", "cbt": "seeded"}, 3)
    session.close()
    assert sent.sent_bytes == BLOCK  # only the change since the backup crossed
    assert latest_bytes(site.root) == bytes(disk.data)


def test_seed_specs():
    from surepoint.errors import InvalidArgument
    from surepoint.jobs.replicate import split_seed

    assert split_seed("/srv/repo:web01:latest") == ("/srv/repo", "web01:latest")
    assert split_seed("/srv/repo:3f9a") == ("/srv/repo", "3f9a")
    assert split_seed("ssh://u@h:2222/srv/repo:web01:latest") == ("ssh://u@h:2222/srv/repo", "web01:latest")
    assert split_seed("s3://bucket/prefix:latest") == ("s3://bucket/prefix", "latest")
    for bad in ("/srv/repo", "/srv/repo:", ":latest"):
        with pytest.raises(InvalidArgument):
            split_seed(bad)


def test_ssh_connection_cut_mid_cycle(sshd, tmp_path):  # noqa: F811 - the fixture
    root = tmp_path / "replicas"
    env = sshd.env()
    # a connection of its own: a multiplexed session lives in the master, which killing the client leaves up
    env["SUREPOINT_SSH_COMMAND"] = env["SUREPOINT_SSH_COMMAND"].replace("ControlMaster=auto", "ControlMaster=no")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        site = RemoteSite(sshd.url(root))
        disk = Disk()
        disk.fill(0, 2 * MIB, 1)
        cycle(site, disk, "f1", full(disk))
        session = site.session("web-replica")
        session.open("web", SOURCE)
        session.begin("f2", {"vda": SIZE})
        session.write("vda", 0, bytes([7]) * MIB)
        session.checksums("vda", 0, BLOCK, BLOCK)
        os.kill(session.conn.proc.pid, signal.SIGKILL)  # the ssh client: the connection is cut
        session.conn.proc.wait()
        with pytest.raises(SurepointError, match="lost the connection"):
            session.commit({"time": "2026-11-30T10:00:00.000000Z", "consistency": "crash"}, 3)
        session.close()
        # the far end saw the connection go, and the next cycle (once its lock is free) completes
        deadline = time.monotonic() + 30
        while True:
            try:
                sent = cycle(site, disk, "f3", compare(disk))
                break
            except ReplicaLocked:
                assert time.monotonic() < deadline, "the far end kept the replica locked"
                time.sleep(0.2)
        record = (root / "web-replica" / "replica.json").read_text()
        assert sent.sent_bytes == 0, record  # the replica still holds exactly the first point
        assert latest_bytes(str(root)) == bytes(disk.data)
        assert sorted(os.listdir(root / "web-replica" / "disks")) == ["vda.base.qcow2", "vda.f3.qcow2"]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
