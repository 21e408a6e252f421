"""Clean interruptions: SIGINT and SIGTERM end a command the same way, saying what they leave behind.

`main()` installs `handle_signals()` first thing: either signal raises `Interrupted` in the main
thread. It is a BaseException (like KeyboardInterrupt), so no `except Exception` swallows it, and
every `finally` and context manager on the way out runs: locks are released, partial files
removed. What an interruption would leave (a block device half written, a VM half restored) is
declared by the code doing it with `at_stake(...)`; `main()` prints those lines, records each as
an event through the hook given with it, and exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class Interrupted(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it replaces
    """The command was stopped by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        self.stakes = stakes()  # taken now: the blocks that declared them are left on the way out
        super().__init__(f"interrupted by {self.signal_name}")


@dataclass
class Stake:
    """What stopping now would leave behind, and how to record it as an event."""

    description: str | Callable[[], str]  # "target /dev/vg0/web01 is half written", or made when asked
    record: Callable[[str], None] | None = None

    def text(self) -> str:
        if not callable(self.description):
            return self.description
        try:
            return self.description()
        except Exception:  # noqa: BLE001 - a broken description must not hide the interruption
            return "state unknown"


_stakes: list[Stake] = []
_lock = threading.Lock()


@contextlib.contextmanager
def at_stake(description: str | Callable[[], str], record: Callable[[str], None] | None = None) -> Iterator[None]:
    """While the block runs, an interruption reports `description` (and records it with `record`).

    `description` may be a function, asked when the interruption comes ("3 of 7 files restored")."""
    stake = Stake(description, record)
    with _lock:
        _stakes.append(stake)
    try:
        yield
    finally:
        with _lock:
            _stakes.remove(stake)


def stakes() -> list[Stake]:
    with _lock:
        return list(_stakes)


_received: list[int] = []  # the first signal received, for worker threads (stop_point)


def _raise(signum, frame) -> None:
    if not _received:
        _received.append(signum)
    raise Interrupted(signum)


def stop_point() -> None:
    """In a worker thread: stop (raise Interrupted) once the command was signalled.

    Signals reach the main thread only; threads doing the work (chunk readers and writers, VMs
    backed up in parallel) call this between pieces of work, so that an interrupted command ends
    promptly instead of finishing every queued piece first."""
    if _received:
        raise Interrupted(_received[0])


def handle_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread from now on."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise)


def report(exc: Interrupted) -> str:
    """The one line an interruption prints; each stake's event is recorded (failures ignored)."""
    held = exc.stakes
    texts = [stake.text() for stake in held]
    for stake, text in zip(held, texts, strict=True):
        if stake.record is not None:
            with contextlib.suppress(Exception):
                stake.record(f"{exc}: {text}")
    if not held:
        return f"{exc}"
    return f"{exc}: " + "; ".join(texts)


# Testing aid: deterministic pauses ---------------------------------------------------------------
# SUREPOINT_PAUSE_AT=<name>[:<n>] and SUREPOINT_PAUSE_DIR=<dir>: the n-th time (first by default)
# the process passes `checkpoint(name)` it creates <dir>/<name>.reached, then waits until a test
# creates <dir>/<name>.go or the command is signalled. Meanwhile the test runs a concurrent command
# or sends a signal, and the signal lands exactly there: in the main thread the handler raises
# Interrupted out of the wait; in a worker thread the wait ends and the caller's next stop_point
# raises it. Nothing races a sleep. Unset, a checkpoint costs a dict lookup.
_passed: dict[str, int] = {}


def checkpoint(name: str) -> None:
    wanted = os.environ.get("SUREPOINT_PAUSE_AT")
    if not wanted or wanted.split(":", 1)[0] != name:
        return
    nth = int(wanted.split(":", 1)[1]) if ":" in wanted else 1
    with _lock:
        _passed[name] = _passed.get(name, 0) + 1
        if _passed[name] != nth:
            return
    directory = os.environ["SUREPOINT_PAUSE_DIR"]
    go = os.path.join(directory, f"{name}.go")
    reached = os.path.join(directory, f"{name}.reached")
    with open(reached + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(reached + ".tmp", reached)
    while not os.path.exists(go) and not _received:
        time.sleep(0.01)
