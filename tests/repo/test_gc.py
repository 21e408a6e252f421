"""Garbage collection in process: forget then gc, gc beside a running backup, trash, temporaries."""

from __future__ import annotations

import random
import threading
import time

import pytest

from surepoint.errors import UnreadableRestorePoints
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import chunk_id_from_name, chunk_object_name
from surepoint.repo.gc import collect_garbage
from surepoint.storage.backend import TemporaryInfo
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes
from tests.repo.test_restore import restored_bytes

HOUR = 3600


def age_everything(backend, seconds: float = HOUR) -> None:
    for info in list(backend.list("")):
        backend.set_mtime(info.name, info.mtime - seconds)


def stored_chunks(repository) -> set[bytes]:
    return {chunk_id_from_name(i.name) for i in repository.backend.list("chunks/")}


def referenced(repository, point) -> set[bytes]:
    return {c for d in point.disks for c in repository.load_index(point, d.number).ids} - {bytes(32)}


def test_forget_then_gc_removes_exactly_what_nobody_needs(repository):
    a = run_backup(repository, BackupRequest(name="a", sources=[MemoryDisk(disk_bytes(6 * CHUNK, seed=1))]))
    b = run_backup(repository, BackupRequest(name="b", sources=[MemoryDisk(disk_bytes(5 * CHUNK, seed=2))]))
    assert collect_garbage(repository, margin=0).removed_chunks == 0  # everything is referenced
    keep, only_a = referenced(repository, b), referenced(repository, a) - referenced(repository, b)
    repository.delete_restore_point(a)
    age_everything(repository.backend)
    unreferenced = stored_chunks(repository) - keep
    assert unreferenced == only_a and unreferenced
    result = collect_garbage(repository, margin=60)
    assert result.removed_chunks == len(unreferenced)
    assert stored_chunks(repository) == keep
    assert result.referenced_chunks == len(keep)
    assert [p.id for p in repository.list_restore_points()] == [b.id]
    assert restored_bytes(repository, b) == bytes(disk_bytes(5 * CHUNK, seed=2))
    assert list(repository.backend.list("trash/")) == [] and list(repository.backend.list("locks/")) == []


def test_dry_run_deletes_nothing(repository):
    a = run_backup(repository, BackupRequest(name="a", sources=[MemoryDisk(disk_bytes(4 * CHUNK, seed=3))]))
    repository.delete_restore_point(a)
    age_everything(repository.backend)
    before = sorted(i.name for i in repository.backend.list(""))
    result = collect_garbage(repository, dry_run=True, margin=60)
    assert result.removed_chunks == 3 and result.removed_bytes > 0
    assert sorted(i.name for i in repository.backend.list("")) == before


def test_recent_unreferenced_chunks_are_kept(repository):
    a = run_backup(repository, BackupRequest(name="a", sources=[MemoryDisk(disk_bytes(4 * CHUNK, seed=4))]))
    repository.delete_restore_point(a)
    result = collect_garbage(repository)  # written seconds ago: inside the margin
    assert result.removed_chunks == 0 and result.kept_recent_chunks == 3


def test_gc_beside_a_running_backup(repository):
    """A backup that reuses old chunks and writes new ones while gc runs loses nothing."""
    old_data = disk_bytes(6 * CHUNK, seed=5)
    old = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(old_data)]))
    repository.delete_restore_point(old)  # its chunks are unreferenced now...
    age_everything(repository.backend)  # ...and old: only the running backup protects them

    reached, release = threading.Event(), threading.Event()

    class Paused(MemoryDisk):
        def read(self, offset, length):
            if offset == 3 * CHUNK:  # half-way: the first chunks are claimed, the rest is not read yet
                reached.set()
                assert release.wait(60)
            return super().read(offset, length)

    new_data = bytearray(old_data)
    new_data[5 * CHUNK :] = random.Random(6).randbytes(CHUNK)  # the last chunk is new, the others reused
    outcome: dict = {}

    def run() -> None:
        request = BackupRequest(name="vm", sources=[Paused(new_data)])
        outcome["point"] = run_backup(repository, request, workers=1)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert reached.wait(60)
        result = collect_garbage(repository, margin=60)
    finally:
        release.set()
        thread.join()
    point = outcome["point"]
    # chunks 1 and 2 were claimed before the pause and kept; chunks 3 and 5 were not claimed yet and
    # went: the backup found chunk 3 gone when it got there, and wrote it again
    assert (result.kept_recent_chunks, result.removed_chunks) == (2, 2)
    assert point.disks[0].new_chunks == 2 and point.disks[0].reused_chunks == 2
    assert restored_bytes(repository, point) == bytes(new_data)


def test_gc_after_the_backup_ended_collects_only_the_unreferenced(repository):
    data = disk_bytes(4 * CHUNK, seed=7)
    first = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(data)]))
    repository.delete_restore_point(first)
    age_everything(repository.backend)
    changed = bytearray(data)
    changed[CHUNK : 2 * CHUNK] = random.Random(8).randbytes(CHUNK)
    second = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(changed)]))
    age_everything(repository.backend)
    result = collect_garbage(repository, margin=60)
    assert result.removed_chunks == 1  # the chunk of the forgotten point that changed
    assert restored_bytes(repository, second) == bytes(changed)


def test_trash_left_by_an_interrupted_gc(repository):
    point = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(disk_bytes(3 * CHUNK, seed=9))]))
    needed = sorted(referenced(repository, point))[0]
    repository.backend.rename(chunk_object_name(needed), f"trash/{needed.hex()}")
    repository.backend.put(f"trash/{'ee' * 32}", b"an unreferenced chunk")
    result = collect_garbage(repository, margin=60)
    assert result.restored_from_trash == 1
    assert list(repository.backend.list("trash/")) == []
    assert repository.backend.exists(chunk_object_name(needed))
    assert restored_bytes(repository, point) == bytes(disk_bytes(3 * CHUNK, seed=9))


def test_gc_stops_when_an_index_is_unreadable(repository):
    point = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(disk_bytes(3 * CHUNK, seed=10))]))
    other = run_backup(repository, BackupRequest(name="x", sources=[MemoryDisk(disk_bytes(3 * CHUNK, seed=11))]))
    repository.delete_restore_point(other)
    repository.backend.delete(point.disks[0].index)
    age_everything(repository.backend)
    before = sorted(i.name for i in repository.backend.list(""))
    with pytest.raises(UnreadableRestorePoints, match=point.id):
        collect_garbage(repository, margin=60)
    assert sorted(i.name for i in repository.backend.list("") if not i.name.startswith("locks/")) == before


def test_abandoned_temporaries(repository):
    now = time.time()
    deleted: list[str] = []
    backend = repository.backend
    leftovers = [
        TemporaryInfo("chunks/aa/aa.1.1.tmp", 10, now - 2 * HOUR, writer_gone=False),  # old: writer must be dead
        TemporaryInfo("chunks/bb/bb.2.1.tmp", 10, now - 600, writer_gone=True),  # older than the margin, writer gone
        TemporaryInfo("chunks/cc/cc.3.1.tmp", 10, now - 600, writer_gone=False),  # maybe still being written
        TemporaryInfo("chunks/dd/dd.4.1.tmp", 10, now - 5, writer_gone=True),  # inside the margin
    ]
    delete = backend.delete

    def recording_delete(name: str) -> None:
        deleted.append(name)
        delete(name)

    backend.list_temporary = lambda: iter(leftovers)
    backend.delete = recording_delete
    result = collect_garbage(repository, margin=300)
    assert result.removed_temporary == 2
    assert sorted(n for n in deleted if n.endswith(".tmp")) == ["chunks/aa/aa.1.1.tmp", "chunks/bb/bb.2.1.tmp"]
