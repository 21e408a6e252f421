"""Repository locks in process: which kinds exclude which, stale locks, reading from a read-only repository."""

from __future__ import annotations

import json
import socket

import pytest

from surepoint.errors import RepositoryLocked, StorageError
from surepoint.repo.locks import LOCK_PREFIX, read_locks, remove_stale_locks, repository_lock
from surepoint.storage.memory import MemoryBackend
from tests.storage.test_local import dead_pid


def test_backups_run_side_by_side_and_gc_with_them():
    backend = MemoryBackend()
    with repository_lock(backend, "backup"), repository_lock(backend, "backup"), repository_lock(backend, "gc"):
        assert sorted(lock.kind for lock in read_locks(backend)) == ["backup", "backup", "gc"]
    assert read_locks(backend) == []


@pytest.mark.parametrize(
    "held, wanted",
    [("gc", "gc"), ("forget", "forget"), ("exclusive", "backup"), ("exclusive", "restore"), ("backup", "exclusive")],
)
def test_conflicting_kinds(held, wanted):
    backend = MemoryBackend()
    with repository_lock(backend, held) as mine:
        with pytest.raises(RepositoryLocked, match=f"{held} by pid"), repository_lock(backend, wanted):
            pytest.fail("a conflicting lock was granted")
        assert [lock.id for lock in read_locks(backend)] == [mine.id]  # the loser removed its own


def test_stale_locks_do_not_block_and_are_removed():
    backend = MemoryBackend()
    stale = {"id": "dead", "kind": "gc", "host": socket.gethostname(), "pid": dead_pid(), "created": 1.0}
    backend.put(LOCK_PREFIX + "dead", json.dumps({**stale, "refreshed": 1.0}).encode())
    other_host = {"id": "away", "kind": "gc", "host": "elsewhere.invalid", "pid": 1, "created": 1.0, "refreshed": 1.0}
    backend.put(LOCK_PREFIX + "away", json.dumps(other_host).encode())
    backend.put(LOCK_PREFIX + "junk", b"not json")
    with repository_lock(backend, "gc"):
        pass
    assert sorted(lock.id for lock in remove_stale_locks(backend)) == ["away", "dead"]
    assert [i.name for i in backend.list(LOCK_PREFIX)] == [LOCK_PREFIX + "junk"]


def test_reading_needs_no_lock_object_on_a_read_only_repository():
    class ReadOnly(MemoryBackend):
        refuse = False

        def put(self, name, data, *, durable=True):
            if self.refuse:
                raise StorageError(f"repository storage is read-only (writing {name})")
            super().put(name, data, durable=durable)

    backend = ReadOnly()
    backend.refuse = True
    with repository_lock(backend, "restore"), repository_lock(backend, "verify"):
        assert read_locks(backend) == []
    with pytest.raises(StorageError), repository_lock(backend, "backup"):
        pytest.fail("a writer ran without its lock")
    backend.refuse = False
    with repository_lock(backend, "exclusive"):
        backend.refuse = True
        with pytest.raises(RepositoryLocked), repository_lock(backend, "restore"):
            pytest.fail("a reader ran beside an exclusive job")
        backend.refuse = False


def test_verify_holds_a_verify_lock_and_waits_for_no_backup(repository):
    from surepoint.repo.backup import BackupRequest, run_backup
    from surepoint.repo.verify import verify
    from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes

    point = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(disk_bytes(3 * CHUNK, seed=1))]))
    seen: list[str] = []
    get = repository.backend.get

    def watching_get(name: str) -> bytes:
        if name.startswith("chunks/"):
            seen.extend(lock.kind for lock in read_locks(repository.backend))
        return get(name)

    repository.backend.get = watching_get
    with repository_lock(repository.backend, "backup"):
        report = verify(repository, [point])
    assert report.points[0].state == "verified" and set(seen) == {"backup", "verify"}
    with repository_lock(repository.backend, "exclusive"), pytest.raises(RepositoryLocked):
        verify(repository, [point])
