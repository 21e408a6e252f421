"""Power cuts at many points of backup, forget, gc and passwd: nothing committed is lost or damaged.

The CI run checks a few dozen crash states (SUREPOINT_POWERLOSS_POINTS, default 24, plus both sides
of every command boundary); SUREPOINT_POWERLOSS_POINTS=all checks every one (bench/powerloss.py
prints the figures).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.powerloss.matrix import check, crash_points, describe, record

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]


def _count() -> int | None:
    wanted = os.environ.get("SUREPOINT_POWERLOSS_POINTS", "24")
    return None if wanted == "all" else int(wanted)


@pytest.fixture
def scratch(tmp_path):
    """Crash states are written and checked in memory (tmpfs) when there is one: fsync is free there."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        where = tempfile.mkdtemp(prefix="surepoint-powerloss-", dir="/dev/shm")
        yield Path(where)
        shutil.rmtree(where, ignore_errors=True)
    else:
        yield tmp_path / "states"


def test_power_cuts_lose_nothing_committed(tmp_path, scratch):
    started = time.monotonic()
    load = record(tmp_path)
    recorded = time.monotonic() - started
    states = crash_points(load, _count())
    failures = []
    for state in states:
        problems = check(load, state, scratch)
        if problems:
            failures.append(f"{describe(load, state)}: " + "; ".join(problems))
    # the command agrees with the library where every command has returned
    last = len(load.recording.fs.snapshots) - 1
    if problems := check(load, last, scratch, through_cli=True):
        failures.append(f"{describe(load, last)}, through the command: " + "; ".join(problems))
    total = len(load.recording.fs.snapshots)
    print(
        f"power-loss matrix: {len(states)} of {total} crash states checked, recording {recorded:.1f} s,"
        f" checks {time.monotonic() - started - recorded:.1f} s, {len(failures)} failed"
    )
    assert not failures, "\n".join(failures)
