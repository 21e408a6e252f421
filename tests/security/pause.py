"""Deterministic pauses in a running command (surepoint.interrupt.checkpoint), for concurrency and signal tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


class Pause:
    """Stops a command at checkpoint `name` (its n-th passage) until `release()`."""

    def __init__(self, directory: Path, name: str, nth: int = 1) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self.env = {"SUREPOINT_PAUSE_AT": f"{name}:{nth}", "SUREPOINT_PAUSE_DIR": str(directory)}

    def wait(self, proc: subprocess.Popen, timeout: float = 180) -> None:
        """Until the command stands at the checkpoint (it fails the test if the command ends first)."""
        reached = self.directory / f"{self.name}.reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the command ended ({proc.returncode}) before {self.name}:\n{out}\n{err}")
            assert time.monotonic() < deadline, f"the command never reached {self.name}"
            time.sleep(0.02)

    def release(self) -> None:
        (self.directory / f"{self.name}.go").touch()


@contextlib.contextmanager
def paused_at(pause: Pause, argv: list[str], env: dict[str, str], timeout: float = 180) -> Iterator[subprocess.Popen]:
    """Run `argv` (text pipes) until it stands at the pause's checkpoint; yield it there. It is killed
    if the block leaves it running (a failed assertion)."""
    proc = subprocess.Popen(
        argv, env={**env, **pause.env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        pause.wait(proc, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def interrupt(
    pause: Pause, argv: list[str], env: dict[str, str], signum: int, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run `argv` to the pause's checkpoint and signal it there (the signal lands exactly there)."""
    with paused_at(pause, argv, env, timeout) as proc:
        os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]
