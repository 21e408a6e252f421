"""Reader locks: restore, mount, instant recovery, lab, copy and verify hold the points they read.

A forget keeps a held point (and says which reader holds it), so gc keeps its chunks; a reader
that starts while a forget runs waits for it; a point forgotten anyway is "removed by a concurrent
forget", never damage. The concurrency tests run real processes and stop the reader at a
checkpoint (tests/security/pause.py), so nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from surepoint.errors import RepositoryLocked, RestorePointForgotten
from surepoint.events import EventRecorder
from surepoint.jobs.retention import forget_by_policy
from surepoint.repo import locks
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.gc import collect_garbage
from surepoint.repo.locks import LockConflict, held_points, reader_lock, repository_lock
from surepoint.repo.repository import MANIFEST_PREFIX, Repository
from surepoint.repo.retention import Policy
from surepoint.storage.memory import MemoryBackend
from tests.faultlib import MiB, Repo, make_random_image, sha256_file
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes
from tests.security.pause import Pause, paused_at


@pytest.fixture
def repository() -> Repository:
    return Repository.create(MemoryBackend(), chunk_size=CHUNK)


def _points(repository: Repository, count: int, name: str = "vm"):
    return [
        run_backup(repository, BackupRequest(name=name, sources=[MemoryDisk(disk_bytes(3 * CHUNK, seed=i + 10))]))
        for i in range(count)
    ]


def test_forget_keeps_what_a_reader_holds_and_names_the_reader(repository):
    old, new = _points(repository, 2)
    with repository.reading([old], "mount", "mount at /mnt/x"):
        assert held_points(repository.backend)[old.id].purpose == "mount at /mnt/x"
        result = forget_by_policy(repository, EventRecorder(None, repository.id), Policy(last=1))
        assert [d.id for d in result.held] == [old.id]
        assert "mount (mount at /mnt/x) by pid" in result.held[0].held_by
        assert [p.id for p in repository.list_restore_points()] == [old.id, new.id]
        collect_garbage(repository, margin=0)
        ids = [c for c in repository.load_index(old, 0).ids if c != ZERO_ID]
        assert ids and all(repository.chunks.get(c) for c in ids)  # its chunks are all there
    result = forget_by_policy(repository, EventRecorder(None, repository.id), Policy(last=1))
    assert not result.held and [p.id for p in repository.list_restore_points()] == [new.id]


def test_a_reader_waits_for_a_running_forget_then_finds_its_point_gone(repository, monkeypatch):
    (point,) = _points(repository, 1)
    forget = repository_lock(repository.backend, "forget")
    forget.__enter__()
    waits: list[float] = []

    def forget_finishes(seconds: float) -> None:  # the reader's first wait: the forget ends meanwhile
        waits.append(seconds)
        repository.delete_restore_point(point)
        forget.__exit__(None, None, None)

    monkeypatch.setattr(locks.time, "sleep", forget_finishes)
    with (
        pytest.raises(RestorePointForgotten, match="removed by a concurrent forget"),
        repository.reading([point], "restore", "restore to /tmp/x"),
    ):
        pytest.fail("read a forgotten point")
    assert len(waits) == 1
    assert locks.read_locks(repository.backend) == []


def test_a_reader_gives_up_on_a_forget_that_does_not_end(repository):
    (point,) = _points(repository, 1)
    with (
        repository_lock(repository.backend, "forget"),
        pytest.raises(LockConflict, match="forget by pid"),
        reader_lock(repository.backend, "copy", [point.id], "copy", wait=0),
    ):
        pytest.fail("read beside a forget")


def test_lock_records_with_points_are_checked(repository):
    backend = repository.backend
    good = {"id": "a" * 16, "kind": "mount", "host": "h", "pid": 1, "created": 1.0, "refreshed": 1.0}
    for bad in ({"points": "ab"}, {"points": [1]}, {"points": ["x" * 65]}, {"purpose": 7}, {"other": 1}):
        backend.put("locks/" + "a" * 16, json.dumps({**good, **bad}).encode())
        assert locks.read_locks(backend) == []  # a damaged record is no lock, never a traceback
    backend.put("locks/" + "a" * 16, json.dumps({**good, "points": ["ab"], "purpose": "lab"}).encode())
    assert locks.read_locks(backend)[0].points == ["ab"]


def test_a_dead_readers_lock_is_stale(tmp_path):
    from surepoint import storage

    repository = Repository.create(storage.open(str(tmp_path / "repo"), create=True), chunk_size=CHUNK)
    old, _new = _points(repository, 2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only writes its lock and dies
        lock = repository_lock(repository.backend, "mount", points=[old.id], purpose="mount")
        lock.__enter__()
        os._exit(0)
    os.waitpid(pid, 0)
    assert [lk.pid for lk in locks.read_locks(repository.backend)] == [pid]
    result = forget_by_policy(repository, EventRecorder(None, repository.id), Policy(last=1))
    assert not result.held and [d.id for d in result.forgotten] == [old.id]


# -- real processes: copy + forget + gc ----------------------------------------------------------


def test_copy_holds_its_points_against_forget_and_gc(tmp_path: Path):
    source = Repo(tmp_path / "src", encryption="aes-256-gcm", passphrase="source secret")
    source.init()
    image = tmp_path / "disk.img"
    sha = [make_random_image(image, MiB, seed=1)]
    source.backup(image, name="vm")
    sha.append(make_random_image(image, MiB, seed=2))
    source.backup(image, name="vm")
    for seed in (3, 4):
        make_random_image(image, MiB, seed=seed)
        source.backup(image, name="junk")
    vm_points = [p["id"] for p in source.points() if p["name"] == "vm"]
    target = Repo(tmp_path / "dst", encryption="none")
    target.init()
    pause = Pause(tmp_path / "pause", "copy-point")  # after the first point is copied, before the second
    env = target.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase)
    with paused_at(pause, target.argv(["copy", "vm", "--from", str(source.path), "--json"]), env) as proc:
        holders = [json.loads(p.read_text()) for p in source.locks()]
        assert [(h["kind"], sorted(h["points"])) for h in holders] == [("copy", sorted(vm_points))]
        line = source.fails("forget", "--keep-last", "1", code=1, words=["being read", "copy", "pid"])
        assert vm_points[0] in line
        assert source.ok("gc", "--grace", "0", "--json").json()["removed_chunks"] > 0  # junk's first point
        pause.release()
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert [c["id"] for c in json.loads(out)["copied"]] == vm_points
    for point, digest in zip(vm_points, sha, strict=True):
        target.restore_matches(point, digest)
    assert source.locks() == []
    source.ok("forget", "--keep-last", "1")  # the copy is over: now it goes
    assert vm_points[0] not in source.point_ids()


def test_verify_holds_its_points_against_forget_and_gc(tmp_path: Path):
    """A verify paused mid-check: forget keeps its points and names it, gc removes only other data,
    and the verify ends with every point verified (before, the pulled-away chunks read as damage)."""
    repo = Repo(tmp_path / "v", encryption="none")
    repo.init()
    image = tmp_path / "disk.img"
    for seed in (1, 2):
        make_random_image(image, MiB, seed=seed)
        repo.backup(image, name="vm")
    make_random_image(image, MiB, seed=3)
    repo.backup(image, name="junk")
    make_random_image(image, MiB, seed=4)
    repo.backup(image, name="junk")
    vm_points = [p["id"] for p in repo.points() if p["name"] == "vm"]
    pause = Pause(tmp_path / "pause", "verify-chunk")
    with paused_at(pause, repo.argv(["verify", vm_points[0], "--json"]), repo.env()) as proc:
        holders = [json.loads(p.read_text()) for p in repo.locks()]
        assert [(h["kind"], h["points"]) for h in holders] == [("verify", vm_points[:1])]
        line = repo.fails("forget", "--keep-last", "1", code=1, words=["being read", "verify", "pid"])
        assert vm_points[0] in line
        assert repo.ok("gc", "--grace", "0", "--json").json()["removed_chunks"] > 0  # junk's first point
        pause.release()
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert [(p["id"], p["state"]) for p in report["points"]] == [(vm_points[0], "verified")]
    assert report["damaged_chunks"] == 0 and report["forgotten"] == []
    assert repo.locks() == []


def test_verify_names_a_point_forgotten_before_it_began(repository):
    """Listed, then forgotten before verify's lock was in place: named as forgotten, not damaged."""
    from surepoint.repo.verify import verify

    old, new = _points(repository, 2)
    repository.delete_restore_point(old)
    report = verify(repository, [old, new])
    assert report.forgotten == [old.id] and not report.damaged
    assert [(p.id, p.state) for p in report.points] == [(new.id, "verified")]


# -- real processes: mount + forget + gc ----------------------------------------------------------

mount_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse (FUSE mounts)"
)


@pytest.fixture
def mrepo(tmp_path: Path):
    repo = Repo(tmp_path / "m", encryption="none")
    repo.state_dir = tmp_path / "mount-state"
    yield repo
    repo.run("umount", "--all", "--lazy", env=repo.env(SUREPOINT_MOUNT_STATE_DIR=str(repo.state_dir)))


def _mount_env(repo: Repo, **extra: str) -> dict:
    return repo.env(SUREPOINT_MOUNT_STATE_DIR=str(repo.state_dir), **extra)


@pytest.mark.root
@mount_tools
def test_a_mount_holds_its_point_against_forget_and_gc_while_it_serves(tmp_path: Path, mrepo: Repo):
    mrepo.init()
    image = tmp_path / "disk.img"
    first = make_random_image(image, 2 * MiB, seed=7)
    old = mrepo.backup(image, name="guest")["id"]
    make_random_image(image, 2 * MiB, seed=8)
    mrepo.backup(image, name="guest")
    where = tmp_path / "mnt"
    where.mkdir()
    state = mrepo.run("mount", old, str(where), "--images-only", "--json", env=_mount_env(mrepo)).json()
    (held,) = [json.loads(p.read_text()) for p in mrepo.locks()]
    assert held["kind"] == "mount" and held["points"] == [old] and held["pid"] == state["pid"]
    line = mrepo.fails("forget", "--keep-last", "1", code=1, words=["being read", "mount at", "pid"])
    assert old in line
    mrepo.ok("gc", "--grace", "0")
    raw = where / "disks" / "0-disk.img.raw"
    assert sha256_file(raw) == first  # every byte still served
    mrepo.ok("umount", str(where), env=_mount_env(mrepo))
    assert mrepo.locks() == []
    mrepo.ok("forget", "--keep-last", "1")
    assert old not in mrepo.point_ids()


@pytest.mark.root
@mount_tools
def test_a_mount_whose_server_died_holds_nothing(tmp_path: Path, mrepo: Repo):
    mrepo.init()
    image = tmp_path / "disk.img"
    make_random_image(image, MiB, seed=9)
    old = mrepo.backup(image, name="guest")["id"]
    mrepo.backup(image, name="guest")
    where = tmp_path / "mnt"
    where.mkdir()
    state = mrepo.run("mount", old, str(where), "--images-only", "--json", env=_mount_env(mrepo)).json()
    os.kill(state["pid"], signal.SIGKILL)
    mrepo.ok("forget", "--keep-last", "1")  # the dead server's lock is stale
    assert old not in mrepo.point_ids()


@pytest.mark.root
@mount_tools
def test_a_point_forgotten_under_a_mount_anyway_reads_as_forgotten_not_damage(tmp_path: Path, mrepo: Repo):
    """As an older client's forget and gc would do it (no reader locks): EIO, and the log says why."""
    mrepo.init()
    image = tmp_path / "disk.img"
    make_random_image(image, MiB, seed=10)
    point = mrepo.backup(image, name="guest")["id"]
    where = tmp_path / "mnt"
    where.mkdir()
    state = mrepo.run("mount", point, str(where), "--images-only", "--json", env=_mount_env(mrepo)).json()
    (mrepo.path / MANIFEST_PREFIX / point).unlink()
    for chunk in (mrepo.path / "chunks").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(OSError), open(where / "disks" / "0-disk.img.raw", "rb") as f:
        f.read()
    log = Path(state["log"]).read_text()
    assert "removed by a concurrent forget" in log and "missing" not in log


def test_forget_and_a_reader_starting_together_never_both_go_ahead(repository):
    """Many rounds of a reader and a forget racing for real (threads): the point is either read
    whole or refused as forgotten, never forgotten while held."""

    def read(point, outcome: list[str], forget_done: threading.Event) -> None:
        try:
            with repository.reading([point], "restore", "race"):
                forget_done.wait(60)  # hold the point until the forget has run
                outcome.append("read" if repository.backend.exists(MANIFEST_PREFIX + point.id) else "LOST")
        except (RestorePointForgotten, RepositoryLocked):
            outcome.append("refused")

    for _ in range(20):
        (point,) = _points(repository, 1, name="race")
        _points(repository, 1, name="race")
        outcome: list[str] = []
        forget_done = threading.Event()
        reader = threading.Thread(target=read, args=(point, outcome, forget_done))
        reader.start()
        forget_by_policy(repository, EventRecorder(None, repository.id), Policy(last=1), name="race")
        forget_done.set()
        reader.join()
        assert outcome in (["read"], ["refused"])  # never LOST: forgotten while the reader held it
        for p in repository.list_restore_points():
            repository.delete_restore_point(p)


def test_a_point_forgotten_between_listing_and_reading_is_forgotten_not_damaged(repository, tmp_path):
    from surepoint.errors import DamagedData
    from surepoint.repo.restore import restore_disk
    from surepoint.repo.verify import verify

    old, new = _points(repository, 2)
    listed = repository.list_restore_points()
    repository.delete_restore_point(old)  # a forget that ran before the reader's lock
    with pytest.raises(RestorePointForgotten, match="removed by a concurrent forget") as raised:
        restore_disk(repository, old, 0, str(tmp_path / "out.img"))
    assert not isinstance(raised.value, DamagedData) and not (tmp_path / "out.img").exists()
    assert verify(repository, listed).damaged is False  # verify and gc skip it
    collect_garbage(repository, margin=0)
    assert verify(repository, [new]).points[0].state == "verified"
