"""Deterministic pauses in a running command (surepoint.interrupt.checkpoint), for concurrency and signal tests."""

from __future__ import annotations

import os
import subprocess
import time
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
        fd = os.open(self.directory / f"{self.name}.go", os.O_WRONLY)
        os.close(fd)
