"""The backup engine in process: full and incremental backups, reuse, zero chunks, failing sources."""

from __future__ import annotations

import pytest

from surepoint.errors import SourceError
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import ZERO_ID, chunk_object_name
from surepoint.repo.extents import Extent
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes
from tests.repo.test_restore import restored_bytes


@pytest.mark.s3
def test_full_then_incremental(repository):
    size = 10 * CHUNK + 1234  # a short last chunk
    data = disk_bytes(size, seed=1)
    full_source = MemoryDisk(data)
    full = run_backup(repository, BackupRequest(name="vm", sources=[full_source]), workers=2)
    disk = full.disks[0]
    assert disk.size == size and disk.chunk_size == CHUNK
    assert disk.zero_chunks == 3 and disk.new_chunks == 8 and disk.reused_chunks == 0
    assert disk.metadata["read_mode"] == "full read"
    assert restored_bytes(repository, full) == bytes(data)

    # change two ranges; changed-block tracking names them, so only those chunks are read
    changed = bytearray(data)
    changed[CHUNK + 5 : CHUNK + 9] = b"ABCD"
    changed[size - 10 :] = b"0123456789"
    source = MemoryDisk(changed, changed=[Extent(CHUNK + 5, 4), Extent(size - 10, 10)])
    incremental = run_backup(repository, BackupRequest(name="vm", sources=[source], base=full), workers=2)
    disk = incremental.disks[0]
    assert incremental.parent == full.id
    assert disk.metadata["read_mode"] == "changed blocks only"
    assert source.read_bytes == CHUNK + (size - 10 * CHUNK)
    assert disk.new_chunks == 2
    assert restored_bytes(repository, incremental) == bytes(changed)
    assert restored_bytes(repository, full) == bytes(data)  # the older point is untouched


@pytest.mark.s3
def test_without_change_tracking_everything_is_read_and_deduplicated(repository):
    data = disk_bytes(6 * CHUNK, seed=2)
    first = run_backup(repository, BackupRequest(name="a", sources=[MemoryDisk(data)]), workers=2)
    source = MemoryDisk(data)
    second = run_backup(repository, BackupRequest(name="a", sources=[source], base=first), workers=2)
    assert source.read_bytes == 6 * CHUNK
    assert second.disks[0].new_chunks == 0 and second.disks[0].reused_chunks == 4
    assert second.disks[0].metadata["read_mode"] == "full read, compared with the previous restore point"


@pytest.mark.s3
def test_several_disks_and_an_empty_one(repository):
    disks = [MemoryDisk(disk_bytes(3 * CHUNK, seed=3), "a"), MemoryDisk(b"", "b"), MemoryDisk(bytes(5000), "c")]
    point = run_backup(repository, BackupRequest(name="multi", sources=disks), workers=2)
    assert [d.name for d in point.disks] == ["a", "b", "c"]
    assert repository.load_index(point, 1).ids == []
    assert repository.load_index(point, 2).ids == [ZERO_ID]
    for disk in disks:
        assert restored_bytes(repository, point, disks.index(disk)) == bytes(disk.data)


@pytest.mark.s3
def test_a_base_chunk_that_is_gone_is_read_again(repository):
    data = disk_bytes(4 * CHUNK, seed=4)
    full = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(data)]), workers=2)
    lost = repository.load_index(full, 0).ids[1]
    repository.backend.delete(chunk_object_name(lost))
    source = MemoryDisk(data, changed=[])  # "nothing changed", but a chunk is missing from the repository
    incremental = run_backup(repository, BackupRequest(name="vm", sources=[source], base=full), workers=2)
    assert source.reads == [(CHUNK, CHUNK)]
    assert restored_bytes(repository, incremental) == bytes(data)


@pytest.mark.s3
def test_a_failing_source_commits_nothing(repository):
    class Failing(MemoryDisk):
        def read(self, offset, length):
            if offset >= 2 * CHUNK:
                raise SourceError("read error on the test disk")
            return super().read(offset, length)

    with pytest.raises(SourceError):
        run_backup(repository, BackupRequest(name="vm", sources=[Failing(disk_bytes(5 * CHUNK, seed=5))]), workers=2)
    assert repository.list_restore_points() == []
    assert list(repository.backend.list("locks/")) == []
    assert list(repository.backend.list("indexes/")) == []
