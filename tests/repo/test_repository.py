"""Repository create/open, passphrases, references to restore points, committing."""

from __future__ import annotations

import json

import pytest

from surepoint.errors import (
    AmbiguousReference,
    DamagedData,
    InvalidRepositoryConfig,
    NoSuchDisk,
    NotARepository,
    NotEncrypted,
    RestorePointNotFound,
    WrongPassphrase,
)
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.repository import CONFIG, LAYOUT_PREFIXES, Repository
from surepoint.storage.memory import MemoryBackend
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes


def backup(repository: Repository, name: str = "vm", *, point_id: str | None = None, size: int = 3 * CHUNK):
    request = BackupRequest(name=name, sources=[MemoryDisk(disk_bytes(size, seed=len(name)))])
    request.restore_point_id = point_id
    return run_backup(repository, request, workers=2)


def test_create_and_open_unencrypted(backend):
    created = Repository.create(backend, chunk_size=CHUNK)
    assert [i.name for i in backend.list("")] == [CONFIG]
    config = json.loads(backend.get(CONFIG))
    assert config["format"] == "surepoint-repository" and config["version"] == 1
    assert config["chunk_size"] == CHUNK and config["encryption"] is None
    opened = Repository.open(backend, lambda: pytest.fail("an unencrypted repository asks no passphrase"))
    assert opened.id == created.id and opened.encryption == "none"


def test_create_prepares_the_layout():
    prepared: list[str] = []

    class Recording(MemoryBackend):
        def prepare(self, prefixes):
            prepared.extend(prefixes)

    Repository.create(Recording(), chunk_size=CHUNK)
    assert prepared == list(LAYOUT_PREFIXES)
    assert {"indexes/", "restorepoints/", "locks/", "trash/", "chunks/00/", "chunks/ff/"} <= set(prepared)


@pytest.mark.parametrize("chunk_size", [0, 1000, 32 << 10, 128 << 20, (1 << 20) + 1])
def test_bad_chunk_sizes(backend, chunk_size):
    with pytest.raises(InvalidRepositoryConfig, match="power of two"):
        Repository.create(backend, chunk_size=chunk_size)
    assert list(backend.list("")) == []


def test_bad_encryption_settings(backend):
    with pytest.raises(InvalidRepositoryConfig, match="unknown encryption"):
        Repository.create(backend, encryption="rot13", passphrase="x")
    with pytest.raises(InvalidRepositoryConfig, match="non-empty passphrase"):
        Repository.create(backend, encryption="aes-256-gcm", passphrase="")
    assert list(backend.list("")) == []


def test_wrong_passphrase_and_passphrase_change(encrypted):
    backend = encrypted.backend
    point = backup(encrypted)
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, lambda: "battery staple")
    encrypted.change_passphrase("correct horse", "nëw pässphrase")
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, lambda: "correct horse")
    reopened = Repository.open(backend, lambda: "nëw pässphrase")
    assert reopened.resolve(point.id) == point
    with pytest.raises(InvalidRepositoryConfig):
        reopened.change_passphrase("nëw pässphrase", "")


def test_not_encrypted_has_no_passphrase(repository):
    with pytest.raises(NotEncrypted):
        repository.change_passphrase("a", "b")


def test_open_something_else(backend):
    with pytest.raises(NotARepository, match="no config"):
        Repository.open(backend, lambda: "")
    backend.put(CONFIG, b"not json {")
    with pytest.raises(NotARepository, match="unreadable"):
        Repository.open(backend, lambda: "")
    backend.put(CONFIG, json.dumps({"format": "other"}).encode())
    with pytest.raises(NotARepository, match="not a surepoint repository"):
        Repository.open(backend, lambda: "")
    backend.put(CONFIG, json.dumps({"format": "surepoint-repository", "version": 2}).encode())
    with pytest.raises(NotARepository, match="version 2"):
        Repository.open(backend, lambda: "")
    config = json.loads(Repository.create(MemoryBackend(), chunk_size=CHUNK).backend.get(CONFIG))
    backend.put(CONFIG, json.dumps({**config, "digest": "sha256"}).encode())
    with pytest.raises(NotARepository, match="digest 'sha256'"):
        Repository.open(backend, lambda: "")


def test_resolve_references(repository):
    first = backup(repository, "web", point_id="ab00000000000001")
    second = backup(repository, "web", point_id="ab00000000000002")
    db = backup(repository, "db", point_id="cd00000000000003")
    assert [p.id for p in repository.list_restore_points()] == [first.id, second.id, db.id]
    assert repository.resolve("web:latest") == second
    assert repository.resolve("latest") == db
    assert repository.resolve("cd") == db
    assert repository.resolve(first.id) == first
    with pytest.raises(AmbiguousReference, match="ambiguous"):
        repository.resolve("ab")
    with pytest.raises(RestorePointNotFound):
        repository.resolve("ef")
    with pytest.raises(RestorePointNotFound):
        repository.resolve("mail:latest")
    with pytest.raises(NoSuchDisk, match="no disk 3"):
        repository.load_index(db, 3)


def test_damaged_manifest_is_set_aside(repository):
    kept = backup(repository, "a")
    broken = backup(repository, "b")
    name = f"restorepoints/{broken.id}"
    blob = bytearray(repository.backend.get(name))
    blob[-1] ^= 1
    repository.backend.put(name, bytes(blob))
    assert repository.list_restore_points() == [kept]
    assert repository.damaged_manifests == [name]


def test_missing_index_is_named_damage(repository):
    point = backup(repository)
    repository.backend.delete(point.disks[0].index)
    with pytest.raises(DamagedData, match="index of disk 0 .* is missing"):
        repository.load_index(point, 0)


def test_commit_writes_the_manifest_last():
    """A crash before the manifest is durable leaves no restore point, only unreferenced objects."""
    order: list[tuple[str, str]] = []

    class Recording(MemoryBackend):
        def put(self, name, data, *, durable=True):
            order.append(("put", name.split("/")[0]))
            super().put(name, data, durable=durable)

        def sync(self):
            order.append(("sync", ""))
            super().sync()

    backend = Recording()
    repository = Repository.create(backend, chunk_size=CHUNK)
    order.clear()
    backup(repository)
    commit = [step for step in order if step[1] != "locks"]
    assert commit[-1] == ("put", "restorepoints")
    assert commit[-2] == ("sync", "")
    assert ("put", "indexes") in commit[:-2] and ("put", "chunks") in commit[:-2]

    backend.crash()  # nothing lost: the manifest and everything before it was durable
    assert len(repository.list_restore_points()) == 1
