"""The log store: shipped log files come back byte for byte, garbage collection keeps their chunks while
a record lists them, and records no image point needs are forgotten."""

from __future__ import annotations

import os

from surepoint.repo.gc import collect_garbage
from surepoint.repo.logstore import LogStore
from surepoint.repo.repository import Repository
from surepoint.storage.local import LocalBackend


def make_repo(tmp_path, encryption: str = "aes-256-gcm") -> Repository:
    path = tmp_path / "repo"
    path.mkdir()
    return Repository.create(LocalBackend(str(path)), encryption=encryption, passphrase="pw", chunk_size=64 << 10)


def test_logs_round_trip_and_survive_gc(tmp_path):
    repo = make_repo(tmp_path)
    store = LogStore(repo)
    wal = [os.urandom(150_000) + bytes(50_000) for _ in range(3)]
    names = ["000000010000000000000003", "000000010000000000000004", "00000002.history"]
    for name, data in zip(names, wal, strict=True):
        store.put("db01", "postgresql", name, data, "2026-12-01T10:00:00.000000Z")
    assert store.has("db01", "postgresql", names[0]) and not store.has("db02", "postgresql", names[0])
    assert [r.file for r in store.list("db01", "postgresql")] == sorted(names)
    assert store.list("db01", "mariadb") == []
    # the series name does not show in object names
    assert not any("db01" in info.name for info in repo.backend.list("logs/"))

    # margin -60: every unreferenced chunk counts as old enough to remove
    result = collect_garbage(repo, margin=-60)
    assert result.removed_chunks == 0
    for name, data in zip(names, wal, strict=True):
        record = next(r for r in store.list("db01", "postgresql") if r.file == name)
        assert store.read(record) == data

    gone = store.forget_before("db01", "postgresql", "000000010000000000000004")
    assert gone == ["000000010000000000000003"]
    result = collect_garbage(repo, margin=-60)
    assert result.removed_chunks >= 3  # the forgotten segment's random chunks
    left = {r.file: r for r in store.list("db01", "postgresql")}
    assert set(left) == {"000000010000000000000004", "00000002.history"}
    assert store.read(left["000000010000000000000004"]) == wal[1]


def test_archive_wal_is_idempotent_and_never_overwrites(tmp_path, cli):
    """archive_command's contract: the same file again succeeds, other contents fail, nothing is replaced."""
    cli.run("init", check=True)
    segment = tmp_path / "000000010000000000000007"
    segment.write_bytes(os.urandom(70_000))
    for _ in range(2):
        stored = cli.run("logs", "archive-wal", "--name", "db01", str(segment), segment.name, check=True)
    assert "already in the repository" in stored.stdout
    listed = cli.run("logs", "list", "postgresql", "db01", "--json", check=True).json()
    assert [(r["file"], r["size"]) for r in listed] == [(segment.name, 70_000)]
    other = tmp_path / "other"
    other.write_bytes(os.urandom(70_000))
    refused = cli.run("logs", "archive-wal", "--name", "db01", str(other), segment.name)
    assert refused.returncode == 1 and "stored already with other contents" in refused.stderr
