"""Restoring a disk in process: bytes equal, sparse files, damage stops the restore without a target."""

from __future__ import annotations

import os

import pytest

from surepoint.errors import DamagedData, TargetError
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import chunk_object_name
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes


def restored_bytes(repository: Repository, point: RestorePoint, disk: int = 0) -> bytes:
    """Restore a disk into a temporary file and return its bytes (pytest's tmp dirs stay small)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        target = os.path.join(directory, "disk.img")
        restore_disk(repository, point, disk, target, workers=2)
        with open(target, "rb") as f:
            return f.read()


def test_restore_is_bit_exact_and_sparse(encrypted, tmp_path):
    data = disk_bytes(9 * CHUNK + 77, seed=7)
    point = run_backup(encrypted, BackupRequest(name="vm", sources=[MemoryDisk(data)]), workers=2)
    target = tmp_path / "out.img"
    result = restore_disk(encrypted, point, 0, str(target), workers=2)
    assert target.read_bytes() == bytes(data)
    assert result.size == len(data) and result.sparse_bytes == 3 * CHUNK
    assert os.stat(target).st_blocks * 512 < len(data)  # zero chunks left as holes
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    with pytest.raises(TargetError, match="already exists"):
        restore_disk(encrypted, point, 0, str(target))
    assert target.read_bytes() == bytes(data)


@pytest.mark.s3
def test_damaged_chunk_leaves_no_target(repository, tmp_path):
    data = disk_bytes(4 * CHUNK, seed=8)
    point = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(data)]), workers=2)
    chunk_id = repository.load_index(point, 0).ids[2]
    name = chunk_object_name(chunk_id)
    blob = bytearray(repository.backend.get(name))
    blob[len(blob) // 2] ^= 0x40
    repository.backend.put(name, bytes(blob))
    target = tmp_path / "out.img"
    with pytest.raises(DamagedData, match=f"bytes {2 * CHUNK}-{3 * CHUNK - 1}"):
        restore_disk(repository, point, 0, str(target), workers=2)
    assert sorted(os.listdir(tmp_path)) == []

    repository.backend.delete(name)
    with pytest.raises(DamagedData, match="missing"):
        restore_disk(repository, point, 0, str(target), workers=2)
    assert sorted(os.listdir(tmp_path)) == []
    assert list(repository.backend.list("locks/")) == []
