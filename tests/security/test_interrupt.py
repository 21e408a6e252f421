"""SIGINT and SIGTERM: one line saying what the target is left in, an event, no lock left, exit 130/143.

The command is stopped (SIGSTOP) once it is visibly at work, signalled, then continued: the
signal always lands in the middle of the work, never before or after it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SUREPOINT

MiB = 1 << 20


def _big_image(path: Path, size: int = 192 * MiB) -> Path:
    block = random.Random(7).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 7 :] + block[: i % 7])  # every chunk different, cheap to make
    return path


def _interrupt_when(argv: list[str], env: dict, ready, signum: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([SUREPOINT, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never got to work"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)
        assert ready(), "the command finished before it could be interrupted"
        os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _locks(cli) -> list[str]:
    return os.listdir(cli.repo / "locks")


def _holds_lock(cli) -> bool:
    """The command holds its lock (written and renamed into place): it is at work."""
    return any(not name.endswith(".tmp") for name in _locks(cli))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_restore_says_so_and_leaves_nothing(cli, tmp_path, signum, code):
    cli.run("init", "--encryption", "none", check=True)
    image = _big_image(tmp_path / "disk.img")
    point = cli.run("backup", str(image), "--name", "disk", "--json", check=True).json()["id"]
    target = tmp_path / "restored.img"
    partial = Path(str(target) + ".surepoint-partial")
    result = _interrupt_when(["restore", point, "--to", str(target)], cli.env, lambda: _holds_lock(cli), signum)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    name = signal.Signals(signum).name
    assert lines[-1] == f"error: interrupted by {name}: nothing was written to {target} (the partial file is removed)"
    assert "Traceback" not in result.stderr
    assert not target.exists() and not partial.exists()
    assert _locks(cli) == []
    events = json.loads(cli.run("events", point, "--json", check=True).stdout)
    events = events["events"] if isinstance(events, dict) else events
    assert any(e["outcome"] == "failed" and f"interrupted by {name}" in e["message"] for e in events), events


def test_an_interrupted_backup_releases_its_lock_and_makes_no_point(cli, tmp_path):
    cli.run("init", "--encryption", "none", check=True)
    image = _big_image(tmp_path / "disk.img")
    result = _interrupt_when(
        ["backup", str(image), "--name", "disk"], cli.env, lambda: _holds_lock(cli), signal.SIGTERM
    )
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: interrupted by SIGTERM: no restore point was written; chunks already stored are reused by the "
        "next backup"
    )
    assert _locks(cli) == []
    assert cli.points() == []
    events = json.loads(cli.run("events", "--json", check=True).stdout)
    events = events["events"] if isinstance(events, dict) else events
    assert any(e["outcome"] == "failed" and "interrupted by SIGTERM" in e["message"] for e in events), events
    cli.run("backup", str(image), "--name", "disk", check=True)  # and the next one just works
