"""The local-directory backend: the conformance suite, plus what only a directory has (temporaries, create)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from surepoint import storage
from surepoint.errors import RepositoryExists, RepositoryNotFound, StorageError, UnsupportedLocation
from surepoint.storage.local import LocalBackend
from tests.storage.suite import BackendSuite


class TestLocalBackend(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path):
        b = storage.open(str(tmp_path / "repo"), create=True)
        yield b
        b.close()

    def age(self, backend, name, seconds):
        st = os.stat(os.path.join(backend.root, name))
        os.utime(os.path.join(backend.root, name), (st.st_atime - seconds, st.st_mtime - seconds))
        return True


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_abandoned_temporaries_are_listed_not_listed_as_objects(tmp_path):
    backend = storage.open(str(tmp_path / "repo"), create=True)
    backend.put("chunks/ab/ab01", b"whole")
    chunk_dir = tmp_path / "repo" / "chunks" / "ab"
    (chunk_dir / f"ab02.{dead_pid()}.1234.tmp").write_bytes(b"half a chu")
    (chunk_dir / f"ab03.{os.getpid()}.1234.tmp").write_bytes(b"being written")
    assert [i.name for i in backend.list("")] == ["chunks/ab/ab01"]
    temporaries = {t.name: t for t in backend.list_temporary()}
    assert sorted(temporaries) == sorted(f"chunks/ab/{n.name}" for n in chunk_dir.glob("*.tmp"))
    gone = {name: t.writer_gone for name, t in temporaries.items()}
    assert sorted(gone.values()) == [False, True]
    assert gone[next(n for n in gone if n.startswith("chunks/ab/ab02."))] is True
    for name in temporaries:
        backend.delete(name)
    assert list(backend.list_temporary()) == []
    assert [p.name for p in chunk_dir.iterdir()] == ["ab01"]


def test_open_and_create(tmp_path):
    with pytest.raises(RepositoryNotFound, match="no repository at"):
        storage.open(str(tmp_path / "missing"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me")
    with pytest.raises(RepositoryExists, match="not empty"):
        storage.open(str(busy), create=True)
    (busy / "config").write_text("{}")
    with pytest.raises(RepositoryExists, match="already exists"):
        storage.open(str(busy), create=True)
    assert sorted(p.name for p in busy.iterdir()) == ["config", "precious.txt"]

    created = storage.open(f"file://{tmp_path}/new/repo", create=True)
    assert isinstance(created, LocalBackend) and created.location == str(tmp_path / "new" / "repo")
    created.prepare(["locks/", "chunks/00/"])
    assert sorted(os.listdir(tmp_path / "new" / "repo")) == ["chunks", "locks"]
    assert isinstance(storage.open(str(tmp_path / "new" / "repo")), LocalBackend)


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(UnsupportedLocation, match=r"gopher://"):
        storage.open("gopher://example.org/repo")
    assert storage.scheme_of("/srv/backup") == "file"
    assert storage.scheme_of("S3://bucket/x") == "s3"


def test_bad_names_are_refused(tmp_path):
    backend = storage.open(str(tmp_path / "repo"), create=True)
    for bad in ("/etc/passwd", "../outside", "chunks/../../x", "a//b", "", "./config"):
        with pytest.raises(ValueError):
            backend.put(bad, b"x")
    assert not (tmp_path / "outside").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_storage_errors_are_one_line(tmp_path):
    backend = storage.open(str(tmp_path / "repo"), create=True)
    backend.prepare(["locks/"])
    os.chmod(tmp_path / "repo" / "locks", 0o500)
    try:
        with pytest.raises(StorageError, match="locks/a") as caught:
            backend.put("locks/a", b"x")
        assert "\n" not in str(caught.value)
        assert list((tmp_path / "repo" / "locks").iterdir()) == []
    finally:
        os.chmod(tmp_path / "repo" / "locks", 0o700)


def test_new_directories_become_durable(tmp_path, monkeypatch):
    """An object put durably into new nested directories: every new directory entry is fsynced."""
    backend = storage.open(str(tmp_path / "repo"), create=True)
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    backend.put("logs/series/writer/000000010000000000000001", b"wal", durable=True)
    root = str(tmp_path / "repo")
    for directory in (root, f"{root}/logs", f"{root}/logs/series", f"{root}/logs/series/writer"):
        assert directory in synced, (directory, synced)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_put_leaves_no_temporary(tmp_path, monkeypatch, interruption):
    backend = storage.open(str(tmp_path / "repo"), create=True)

    def interrupted_fsync(fd: int) -> None:
        raise interruption()  # what a signal handler raises between the write and the rename

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(interruption):
        backend.put("chunks/ab/ab01", b"x" * 100_000)
    monkeypatch.undo()
    assert list(backend.list_temporary()) == []
    assert not backend.exists("chunks/ab/ab01")
    assert [p.name for p in (tmp_path / "repo" / "chunks" / "ab").iterdir()] == []


def test_a_temporary_left_by_kill_9_is_reported_then_collected(tmp_path):
    """kill -9 in the middle of a put (the writer kills itself at its fsync: no race) leaves a
    temporary; list_temporary() says its writer is gone and gc removes it after the grace period."""
    from surepoint.repo.gc import collect_garbage
    from surepoint.repo.repository import Repository

    repository = Repository.create(storage.open(str(tmp_path / "repo"), create=True))
    script = (
        "import os, signal, sys\n"
        "from surepoint import storage\n"
        "backend = storage.open(sys.argv[1])\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "backend.put('chunks/ab/' + 'ab' * 32, b'half a chunk')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "repo")], capture_output=True)
    assert proc.returncode == -9
    left = list(repository.backend.list_temporary())
    assert len(left) == 1 and left[0].writer_gone and left[0].name.startswith("chunks/ab/")
    assert list(repository.backend.list("chunks/")) == []  # never visible as an object
    assert collect_garbage(repository).removed_temporary == 0  # within the grace period: kept
    tmp = os.path.join(repository.backend.root, left[0].name)
    os.utime(tmp, (os.stat(tmp).st_atime - 600, os.stat(tmp).st_mtime - 600))
    assert collect_garbage(repository).removed_temporary == 1
    assert list(repository.backend.list_temporary()) == []
