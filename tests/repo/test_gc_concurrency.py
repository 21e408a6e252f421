"""Garbage collection: it frees what forgotten points alone used, and never what a running backup needs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.faultlib import MiB, Repo, make_image, make_random_image, sha256_file, temporary_files, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def large_image(tmp_path_factory) -> tuple[Path, str]:
    """192 MiB of random bytes: a backup that runs long enough for a few gc runs beside it."""
    path = tmp_path_factory.mktemp("large") / "large.img"
    return path, make_random_image(path, 192 * MiB, seed=4321)


def chunk_files(repo: Repo) -> set[str]:
    chunks = repo.path / "chunks"
    return {str(p.relative_to(repo.path)) for p in chunks.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


def used_chunks(repo: Repo, point_id: str) -> set[str]:
    return {n for n in repo.chunk_names(point_id) if n is not None}


def test_forget_and_gc_remove_only_what_the_forgotten_point_used(tmp_path: Path):
    repo = Repo(tmp_path, encryption="none")
    repo.init()
    img = tmp_path / "vm.img"
    sha1 = make_image(img, 8 * MiB, seed=41, random_share=0.7)
    p1 = repo.backup(img, name="vm")["id"]
    with open(img, "r+b") as f:  # the second half changes: p2 shares the first half with p1
        f.seek(4 * MiB)
        f.write(os.urandom(4 * MiB))
    sha2 = sha256_file(img)
    p2 = repo.backup(img, name="vm")["id"]
    other = tmp_path / "other.img"
    sha3 = make_image(other, 4 * MiB, seed=42)
    p3 = repo.backup(other, name="other")["id"]

    only_p1 = used_chunks(repo, p1) - used_chunks(repo, p2) - used_chunks(repo, p3)
    assert len(only_p1) > 10
    before = chunk_files(repo)
    size_before = repo.chunk_bytes()

    repo.ok("forget", "--name", "vm", "--keep-last", "1")
    assert repo.point_ids() == [p2, p3]
    # within the default grace period nothing recent goes
    kept = repo.ok("gc", "--json").json()
    assert kept["removed_chunks"] == 0 and kept["kept_recent_chunks"] == len(only_p1), kept
    assert chunk_files(repo) == before
    dry = repo.ok("gc", "--grace", "0", "--dry-run", "--json").json()
    assert dry["removed_chunks"] == len(only_p1), dry
    assert chunk_files(repo) == before

    result = repo.ok("gc", "--grace", "0", "--json").json()
    assert result["removed_chunks"] == len(only_p1), result
    assert chunk_files(repo) == before - only_p1
    assert repo.chunk_bytes() < size_before
    assert not (repo.path / "indexes" / f"{p1}.0").exists()
    assert list((repo.path / "trash").iterdir()) == []
    repo.verify_clean()
    repo.restore_matches(p2, sha2)
    repo.restore_matches(p3, sha3)
    assert sha1 != sha2
    # a second gc finds nothing more
    again = repo.ok("gc", "--grace", "0", "--json").json()
    assert again["removed_chunks"] == 0 and again["removed_indexes"] == 0, again


@contextlib.contextmanager
def paused(backup: subprocess.Popen):
    """Stop the running backup for the duration of the block (a slow backup, deterministically)."""
    assert backup.poll() is None, "the backup ended before gc could run beside it"
    os.kill(backup.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(backup.pid, signal.SIGCONT)


def gc_beside(repo: Repo) -> dict:
    result = repo.run("gc", "--grace", "0", "--json")
    assert result.returncode == 0, str(result)
    assert "1 backup(s) running" in result.stderr, str(result)
    return result.json()


def gc_until_done(repo: Repo, backup: subprocess.Popen) -> None:
    while backup.poll() is None:
        result = repo.run("gc", "--grace", "0", "--json")
        assert result.returncode == 0, str(result)


def test_gc_during_backup_keeps_its_chunks(tmp_path: Path, large_image):
    image, image_sha = large_image
    repo = Repo(tmp_path, encryption="none")
    repo.init()
    # garbage for gc to find: a forgotten point's chunks
    junk = tmp_path / "junk.img"
    make_random_image(junk, 8 * MiB, seed=5)
    junk_point = repo.backup(junk, name="junk")["id"]
    junk_chunks = used_chunks(repo, junk_point)
    small = tmp_path / "small.img"
    small_sha = make_image(small, 1 * MiB, seed=6)
    keep = repo.backup(small, name="junk")["id"]
    repo.ok("forget", "--name", "junk", "--keep-last", "1")

    before = len(chunk_files(repo))
    backup = repo.popen("backup", str(image), "--name", "vm", "--json")
    try:
        # once it has stored some chunks (none referenced by any point yet)
        assert wait_for(lambda: len(chunk_files(repo)) >= before + 64 or backup.poll() is not None, 120, 0.01)
        with paused(backup):
            during = gc_beside(repo)
        gc_until_done(repo, backup)
    finally:
        out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert "Traceback" not in err
    # the paused backup's chunks were unreferenced, yet kept; the forgotten point's chunks went
    assert during["kept_recent_chunks"] >= 64, during
    assert during["removed_chunks"] == len(junk_chunks), during
    assert not junk_chunks & chunk_files(repo)
    point = json.loads(out)["id"]

    assert repo.point_ids() == [keep, point]
    repo.verify_clean()
    repo.restore_matches(point, image_sha)
    repo.restore_matches(keep, small_sha)
    # a gc after the backup keeps every chunk of the new point
    repo.ok("gc", "--grace", "0")
    assert used_chunks(repo, point) <= chunk_files(repo)
    assert temporary_files(repo) == []


def test_backup_reusing_chunks_of_a_point_forgotten_meanwhile(tmp_path: Path, large_image):
    image, _ = large_image
    repo = Repo(tmp_path, encryption="none")
    repo.init()
    old = repo.backup(image, name="vm")["id"]
    old_chunks = used_chunks(repo, old)
    small = tmp_path / "small.img"
    small_sha = make_image(small, 1 * MiB, seed=7)
    newest = repo.backup(small, name="vm")["id"]
    # new data first (the backup writes it while gc runs), then all of the old point's data: gc collects
    # those chunks before the backup gets to them, and the backup must notice and store them again
    copy = tmp_path / "copy.img"
    make_random_image(copy, 64 * MiB, seed=8)
    with open(copy, "ab") as dst, open(image, "rb") as src:
        shutil.copyfileobj(src, dst, 8 * MiB)
    copy_sha = sha256_file(copy)

    only_old = old_chunks - used_chunks(repo, newest)
    backup = repo.popen("backup", str(copy), "--name", "copy", "--json")
    try:
        assert wait_for(lambda: any(repo.locks()) or backup.poll() is not None, timeout=60, interval=0.001)
        with paused(backup):  # the backup has started: forget and collect the old point under its feet
            repo.ok("forget", "--name", "vm", "--keep-last", "1")
            during = gc_beside(repo)
        gc_until_done(repo, backup)
    finally:
        out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert "Traceback" not in err
    assert during["removed_chunks"] == len(only_old), during
    stats = json.loads(out)["disks"][0]
    assert stats["new_chunks"] >= len(only_old), stats  # it stored them again
    point = json.loads(out)["id"]
    assert repo.point_ids() == [newest, point]
    repo.verify_clean()
    repo.restore_matches(point, copy_sha)
    repo.restore_matches(newest, small_sha)
    assert old_chunks <= used_chunks(repo, point)
    # and once more after a quiet gc: the new point keeps everything it needs
    repo.ok("gc", "--grace", "0")
    repo.verify_clean()
    assert used_chunks(repo, point) <= chunk_files(repo)


def write_lock(repo: Repo, *, kind: str, pid: int, host: str | None = None, age: float = 0) -> Path:
    """A lock object as surepoint/repo/locks.py writes it."""
    now = time.time() - age
    lock_id = os.urandom(8).hex()
    record = {
        "id": lock_id,
        "kind": kind,
        "host": host or socket.gethostname(),
        "pid": pid,
        "created": now,
        "refreshed": now,
    }
    path = repo.path / "locks" / lock_id
    path.write_text(json.dumps(record))
    return path


def test_second_gc_is_refused_while_one_holds_the_lock(tmp_path: Path):
    repo = Repo(tmp_path, encryption="none")
    repo.init()
    img = tmp_path / "vm.img"
    sha = make_image(img, 2 * MiB, seed=8)
    first = repo.backup(img, name="vm")["id"]

    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        lock = write_lock(repo, kind="gc", pid=sleeper.pid)
        repo.fails("gc", "--grace", "0", code=1, words=["locked", f"gc by pid {sleeper.pid}", "unlock"])
        repo.fails("forget", "--keep-last", "1", "--prune", code=1, words=["locked"])
        # a running gc does not stop backups and restores
        second = repo.backup(img, name="vm")["id"]
        repo.restore_matches(first, sha)
        unlock = repo.ok("unlock")
        assert "removed 0 stale lock(s); 1 lock(s) still held" in unlock.stdout, unlock.stdout
        assert lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock no longer counts, and gc clears it away
    repo.ok("gc", "--grace", "0")
    assert repo.locks() == []
    assert repo.point_ids() == [first, second]

    # another host's lock counts until it has not been refreshed for a long time
    fresh = write_lock(repo, kind="gc", pid=1, host="elsewhere.example")
    repo.fails("gc", code=1, words=["locked", "elsewhere.example"])
    fresh.unlink()
    write_lock(repo, kind="gc", pid=1, host="elsewhere.example", age=2 * 3600)
    repo.ok("gc")
    assert repo.locks() == []


def test_two_gc_started_together(tmp_path: Path):
    repo = Repo(tmp_path, encryption="none")
    repo.init()
    img = tmp_path / "vm.img"
    make_image(img, 16 * MiB, seed=9, random_share=0.9)
    repo.backup(img, name="vm")
    other = tmp_path / "other.img"
    other_sha = make_image(other, 2 * MiB, seed=10)
    keep = repo.backup(other, name="vm")["id"]
    repo.ok("forget", "--keep-last", "1")
    for _ in range(3):
        procs = [repo.popen("gc", "--grace", "0") for _ in range(2)]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert "Traceback" not in err, err
            assert proc.returncode in (0, 1), err
            if proc.returncode == 1:
                lines = [line for line in err.splitlines() if line.strip()]
                assert len(lines) == 1 and "locked" in lines[0], err
    assert repo.locks() == []
    assert repo.point_ids() == [keep]
    repo.verify_clean()
    repo.restore_matches(keep, other_sha)
