"""Garbage collection on S3 (no atomic rename): chunks wait in trash/ for one run, still readable there."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from surepoint import storage
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.gc import collect_garbage
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.sources import FileDiskSource
from tests.conftest import change_image, make_image, sha256_file


@pytest.fixture
def repository(seaweedfs, s3_bucket, monkeypatch, tmp_path):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUREPOINT_CACHE_DIR", str(tmp_path / "cache"))
    backend = storage.open(f"s3://{s3_bucket}/repo", create=True)
    repo = Repository.create(backend, encryption="none", chunk_size=1 << 16)
    yield repo
    backend.close()


def backup(repo, image, base=None):
    return run_backup(repo, BackupRequest(name="vm", sources=[FileDiskSource(str(image))], base=base))


def chunk_names(repo, prefix):
    return {info.name.rsplit("/", 1)[-1] for info in repo.backend.list(prefix)}


def test_gc_parks_chunks_for_one_run_and_a_late_reference_brings_them_back(repository, tmp_path):
    repo = repository
    image = make_image(tmp_path / "disk.img", 4 << 20, seed=21, regions=4, region_size=256 << 10)
    first = backup(repo, image)
    first_sha = sha256_file(image)
    manifest = repo.backend.get(f"restorepoints/{first.id}")
    index = repo.backend.get(first.disks[0].index)
    change_image(image, seed=22, writes=20, length=64 << 10)
    second = backup(repo, image, base=first)
    only_first = chunk_names(repo, "chunks/") - {i.hex() for i in repo.load_index(second, 0).ids}
    assert only_first
    repo.delete_restore_point(first)

    result = collect_garbage(repo, margin=0)
    assert result.trashed_chunks == len(only_first) and result.removed_chunks == 0
    assert only_first <= chunk_names(repo, "trash/") and not only_first & chunk_names(repo, "chunks/")

    # A backup that had reused those chunks commits now: its point reads them from trash/...
    repo.backend.put(first.disks[0].index, index)
    repo.backend.put(f"restorepoints/{first.id}", manifest)
    point = repo.resolve(first.id)
    restore_disk(repo, point, 0, str(tmp_path / "late.img"))
    assert sha256_file(tmp_path / "late.img") == first_sha
    # ...and the next gc puts them back.
    result = collect_garbage(repo, margin=0)
    assert result.restored_from_trash == len(only_first) and result.removed_chunks == 0
    assert only_first <= chunk_names(repo, "chunks/") and not chunk_names(repo, "trash/")


def test_a_backup_running_since_before_the_move_keeps_the_trash(repository, tmp_path):
    repo = repository
    image = make_image(tmp_path / "disk.img", 2 << 20, seed=23, regions=3, region_size=256 << 10)
    first = backup(repo, image)
    repo.delete_restore_point(first)
    lock = {
        "id": "0123456789abcdef",
        "kind": "backup",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": time.time() - 5,
        "refreshed": time.time(),
    }
    assert collect_garbage(repo, margin=0).trashed_chunks > 0
    parked = chunk_names(repo, "trash/")
    repo.backend.put("locks/0123456789abcdef", json.dumps(lock).encode())
    time.sleep(1.1)  # LastModified has one-second resolution
    result = collect_garbage(repo, margin=0)
    assert result.removed_chunks == 0 and chunk_names(repo, "trash/") == parked
    repo.backend.delete("locks/0123456789abcdef")
    result = collect_garbage(repo, margin=0)
    assert result.removed_chunks == len(parked) and not chunk_names(repo, "trash/")
