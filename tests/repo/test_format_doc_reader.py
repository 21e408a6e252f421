"""docs/repository-format.md is enough to read a repository: an independent reader restores every point.

The reader (tests/repo/doc_reader.py) follows the document and imports nothing from surepoint;
the repositories are written by surepoint itself. A change to the format that the document does
not follow (or the reverse) fails here.
"""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import pytest

from surepoint import storage
from surepoint.errors import DamagedData
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.extents import Extent
from surepoint.repo.logstore import LogStore
from surepoint.repo.repository import Repository
from tests.repo import doc_reader
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes

PASSPHRASE = "correct horse"


def test_the_reader_imports_nothing_from_surepoint():
    tree = ast.parse(Path(doc_reader.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in modules if m.split(".")[0] in ("surepoint", "tests")}, modules


def make_repository(root: Path, encryption: str) -> tuple[Repository, dict[str, list[bytes]]]:
    """A repository with full and incremental points, several disks, short, zero and empty disks."""
    backend = storage.open(str(root), create=True)
    passphrase = PASSPHRASE if encryption != "none" else None
    repository = Repository.create(backend, encryption=encryption, passphrase=passphrase, chunk_size=CHUNK)
    disks = {
        "a": disk_bytes(7 * CHUNK + 999, seed=1),  # short last chunk
        "b": bytearray(disk_bytes(3 * CHUNK, seed=2) + bytes(100)),  # ends in a short all-zero chunk
        "c": bytearray(5000),  # all zeros
        "d": bytearray(),  # empty
    }
    expected: dict[str, list[bytes]] = {}
    full = run_backup(repository, BackupRequest(name="vm", sources=[MemoryDisk(disks[n], n) for n in "abcd"]))
    expected[full.id] = [bytes(disks[n]) for n in "abcd"]
    changed = bytearray(disks["a"])
    changed[2 * CHUNK + 10 : 2 * CHUNK + 20] = random.Random(3).randbytes(10)
    sources = [MemoryDisk(changed, "a", changed=[Extent(2 * CHUNK + 10, 10)])] + [
        MemoryDisk(disks[n], n, changed=[]) for n in "bcd"
    ]
    incremental = run_backup(repository, BackupRequest(name="vm", sources=sources, base=full))
    expected[incremental.id] = [bytes(changed)] + [bytes(disks[n]) for n in "bcd"]
    other = run_backup(repository, BackupRequest(name="db", sources=[MemoryDisk(disk_bytes(2 * CHUNK, seed=4))]))
    expected[other.id] = [bytes(disk_bytes(2 * CHUNK, seed=4))]
    return repository, expected


def restore_everything(reader: doc_reader.DocReader, expected: dict[str, list[bytes]]) -> None:
    points = reader.manifests()
    assert sorted(p["id"] for p in points) == sorted(expected)
    for point in points:
        assert [reader.restore(point, d["number"]) for d in point["disks"]] == expected[point["id"]]


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm", "chacha20-poly1305"])
def test_reader_restores_every_point_bit_exactly(tmp_path, encryption):
    repository, expected = make_repository(tmp_path / "repo", encryption)
    reader = doc_reader.DocReader(str(tmp_path / "repo"), PASSPHRASE)
    restore_everything(reader, expected)
    # the document's order: `latest` of a name is what surepoint resolves too
    assert reader.latest("vm")["id"] == repository.resolve("vm:latest").id
    assert [p["id"] for p in reader.manifests()] == [p.id for p in repository.list_restore_points()]


def test_reader_after_a_passphrase_change_and_from_a_passphrase_file(tmp_path):
    repository, expected = make_repository(tmp_path / "repo", "aes-256-gcm")
    new = "nëw pässphrase"
    repository.change_passphrase(PASSPHRASE, new)
    with pytest.raises(doc_reader.WrongPassphrase):
        doc_reader.DocReader(str(tmp_path / "repo"), PASSPHRASE)
    pwfile = tmp_path / "pw"
    pwfile.write_bytes(new.encode() + b"\r\n\n")
    restore_everything(doc_reader.DocReader(str(tmp_path / "repo"), doc_reader.passphrase_from_file(pwfile)), expected)


def test_reader_rejects_a_planted_unencrypted_index(tmp_path):
    """The cipher byte must match the repository's: a valid cipher-0 index in an encrypted repository is damage."""
    import blake3

    repository, _expected = make_repository(tmp_path / "repo", "aes-256-gcm")
    point = repository.resolve("db:latest")
    name = point.disks[0].index
    plain = repository.envelope.open(2, name, (tmp_path / "repo" / name).read_bytes())
    header = b"SPO1" + bytes([2, 0, 0, 0])
    forged = header + plain + blake3.blake3(header + name.encode() + plain).digest()
    (tmp_path / "repo" / name).write_bytes(forged)
    reader = doc_reader.DocReader(str(tmp_path / "repo"), PASSPHRASE)
    manifest = next(p for p in reader.manifests() if p["id"] == point.id)
    with pytest.raises(doc_reader.Damaged, match="cipher 0"):
        reader.restore(manifest, 0)
    with pytest.raises(DamagedData, match="cipher 0 does not match"):
        repository.load_index(point, 0)


@pytest.mark.parametrize("encryption", ["none", "chacha20-poly1305"])
def test_reader_reads_shipped_log_files(tmp_path, encryption):
    repository, _expected = make_repository(tmp_path / "repo", encryption)
    wal = random.Random(5).randbytes(2 * CHUNK + 300) + bytes(CHUNK)  # ends in a zero piece
    store = LogStore(repository)
    store.put("db", "postgresql", "000000010000000000000001", wal, covers_until="2026-11-25T11:46:34.123456Z")
    store.put("db", "postgresql", "00000002.history", b"", covers_until="2026-11-25T11:46:35.000000Z")
    reader = doc_reader.DocReader(str(tmp_path / "repo"), PASSPHRASE)
    assert reader.log_file("db", "postgresql", "000000010000000000000001") == wal
    assert reader.log_file("db", "postgresql", "00000002.history") == b""
    restore_everything(reader, _expected)  # log chunks and records do not disturb restore points


def test_reader_ignores_temporaries_and_finds_chunks_in_trash(tmp_path):
    repository, expected = make_repository(tmp_path / "repo", "none")
    root = tmp_path / "repo"
    (root / "restorepoints" / "0123456789abcdef.4242.1.tmp").write_bytes(b"half a manifest")
    point = repository.resolve("db:latest")
    chunk_id = next(c for c in repository.load_index(point, 0).ids if c != bytes(32))
    os.rename(root / "chunks" / chunk_id.hex()[:2] / chunk_id.hex(), root / "trash" / chunk_id.hex())
    restore_everything(doc_reader.DocReader(str(root)), expected)
