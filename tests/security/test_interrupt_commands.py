"""Every long command, interrupted: one line saying what it leaves, an event, no lock, exit 130/143.

Each command is stopped at a checkpoint (surepoint.interrupt.checkpoint, tests/security/pause.py)
in the middle of its work, then signalled there: the signal never races the work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faultlib import SUREPOINT, MiB, Repo, make_random_image
from tests.security.pause import Pause, interrupt, last_line

SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]


def _interrupt(argv: list[str], env: dict, pause: Pause, signum: int) -> subprocess.CompletedProcess:
    result = interrupt(pause, [SUREPOINT, *argv], env, signum, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _last_line(result: subprocess.CompletedProcess) -> str:
    return last_line(result.stderr)


def _failed_events(repo: Repo, signum: int) -> list[str]:
    data = json.loads(repo.ok("events", "--json").stdout)
    events = data["events"] if isinstance(data, dict) else data
    name = signal.Signals(signum).name
    return [e["message"] for e in events if e["outcome"] == "failed" and f"interrupted by {name}" in e["message"]]


def _no_leftovers(repo: Repo) -> None:
    assert repo.locks() == []
    assert [p for p in repo.path.rglob("*.tmp")] == []


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "r", encryption="aes-256-gcm")
    r.init()
    return r


def _points(repo: Repo, tmp_path: Path, count: int, name: str = "disk", size: int = MiB) -> dict[str, str]:
    image = tmp_path / f"{name}.img"
    made = {}
    for seed in range(count):
        sha = make_random_image(image, size, seed=seed + 100)
        made[repo.backup(image, name=name)["id"]] = sha
    return made


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_gc(repo, tmp_path, signum, code):
    points = _points(repo, tmp_path, 3)
    repo.ok("forget", "--keep-last", "1")
    unreferenced = repo.ok("gc", "--grace", "0", "--dry-run", "--json").json()["removed_chunks"]
    result = _interrupt(["gc", "--grace", "0"], repo.env(), Pause(tmp_path / "p", "gc-chunk"), signum)
    assert result.returncode == code, result.stderr
    name = signal.Signals(signum).name
    line = re.fullmatch(
        rf"error: interrupted by {name}: gc removed (\d+) unreferenced chunk\(s\) before it stopped; nothing in "
        r"use was removed \(a chunk parked in trash/ goes back or away at the next gc\)",
        _last_line(result),
    )
    assert line, _last_line(result)
    removed = int(line.group(1))
    # removals run several at a time: those under way when the signal came end and are counted
    assert 1 <= removed <= unreferenced
    assert _failed_events(repo, signum)
    _no_leftovers(repo)
    kept = list(points)[-1]
    repo.restore_matches(kept, points[kept])
    # the count was exact: the next gc removes the rest, no more and no less
    assert repo.ok("gc", "--grace", "0", "--json").json()["removed_chunks"] == unreferenced - removed
    repo.verify_clean()


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_forget(repo, tmp_path, signum, code):
    points = list(_points(repo, tmp_path, 3))
    result = _interrupt(["forget", "--keep-last", "1"], repo.env(), Pause(tmp_path / "p", "forget-point"), signum)
    assert result.returncode == code, result.stderr
    assert _last_line(result).endswith(
        "1 of 2 restore point(s) forgotten before the interruption (their data goes at the next gc); "
        "the others are kept"
    )
    assert repo.point_ids() == points[1:]
    assert _failed_events(repo, signum)
    _no_leftovers(repo)


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_verify(repo, tmp_path, signum, code):
    points = _points(repo, tmp_path, 1, size=2 * MiB)
    result = _interrupt(["verify"], repo.env(), Pause(tmp_path / "p", "verify-chunk", nth=3), signum)
    assert result.returncode == code, result.stderr
    total = len([n for n in repo.chunk_names(next(iter(points))) if n])
    assert _last_line(result).endswith(
        f"3 of {total} chunks checked; no verification result was recorded (run verify again)"
    )
    assert {p["state"] for p in repo.points()} == {"unverified"}
    assert _failed_events(repo, signum)
    _no_leftovers(repo)


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_copy(repo, tmp_path, signum, code):
    points = _points(repo, tmp_path, 2)
    target = Repo(tmp_path / "t", encryption="chacha20-poly1305", passphrase="target", catalog=repo.catalog)
    target.init()
    env = target.env(SUREPOINT_FROM_PASSPHRASE=repo.passphrase)
    result = _interrupt(["copy", "--from", str(repo.path)], env, Pause(tmp_path / "p", "copy-point"), signum)
    assert result.returncode == code, result.stderr
    assert _last_line(result).endswith(
        f"1 of 2 restore point(s) copied to {target.path}; no partial restore point is left there, and the "
        "chunks already sent are not sent again by the next copy"
    )
    first = list(points)[0]
    assert target.point_ids() == [first]
    target.restore_matches(first, points[first])
    assert _failed_events(target, signum)
    _no_leftovers(repo)
    _no_leftovers(target)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_restore_files(tmp_path, signum, code):
    from tests.mount.conftest import make_ext4

    staging = tmp_path / "staging"
    (staging / "many").mkdir(parents=True)
    for n in range(6):
        (staging / "many" / f"file{n}").write_bytes(os.urandom(100_000))
    image = tmp_path / "guest.img"
    make_ext4(image, staging)
    repo = Repo(tmp_path / "r", encryption="none")
    repo.init()
    point = repo.backup(image, name="guest")["id"]
    state_dir = tmp_path / "mount-state"
    env = repo.env(SUREPOINT_MOUNT_STATE_DIR=str(state_dir))
    to = tmp_path / "restored"
    pause = Pause(tmp_path / "p", "restore-file", nth=2)
    result = _interrupt(["restore-files", point, "/many", "--to", str(to)], env, pause, signum)
    assert result.returncode == code, result.stderr
    assert _last_line(result).endswith(
        f"2 files, 0 directories and 0 symlinks restored to {to} before the interruption (a file being "
        "written is removed); the rest are missing"
    )
    restored = sorted((to / "many").iterdir())
    assert len(restored) == 2  # exactly the two reported, whole
    for path in restored:
        assert path.read_bytes() == (staging / "many" / path.name).read_bytes()
    assert _failed_events(repo, signum)
    _no_leftovers(repo)
    left = [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]
    repo.run("umount", "--all", "--lazy", env=env)
    assert not left  # its own mount was taken down on the way out
