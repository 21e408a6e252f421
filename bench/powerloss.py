"""The whole power-loss matrix: every crash state of backup, forget, gc and passwd (tests/powerloss/).

Run as root: uv run --frozen python bench/powerloss.py   (prints the figures, lists every failure)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.powerloss.matrix import check, crash_points, describe, record  # noqa: E402


def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="surepoint-powerloss-") as work,
        tempfile.TemporaryDirectory(prefix="surepoint-powerloss-", dir="/dev/shm") as scratch,
    ):
        started = time.monotonic()
        load = record(Path(work))
        recorded = time.monotonic() - started
        states = crash_points(load, None)
        failed = []
        for state in states:
            if problems := check(load, state, Path(scratch)):
                failed.append(f"{describe(load, state)}: {'; '.join(problems)}")
        checked = time.monotonic() - started - recorded
    print(f"crash states: {len(states)} (every fsync of the workload), failed: {len(failed)}")
    print(f"recording: {recorded:.1f} s; checks: {checked:.1f} s ({checked / max(1, len(states)):.2f} s a state)")
    for line in failed:
        print("  " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
