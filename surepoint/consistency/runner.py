"""Where a writer's commands run: on this host, or inside a guest through qemu-guest-agent.

Writers speak only to a CommandRunner, so one PostgreSQL writer serves a database on the host
and one inside a VM. Commands are always argument vectors, never shell strings.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol

from surepoint.errors import SurepointError


class CommandFailed(SurepointError):
    """A writer's command failed or timed out."""


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        if self.returncode != 0:
            detail = (self.stderr or self.stdout).strip().splitlines()
            raise CommandFailed(f"{self.argv[0]} exited with {self.returncode}: {detail[-1] if detail else ''}")
        return self


def one_line(text: str) -> str:
    """Collapse a command's multi-line output (psql's error plus its indented hint) into one line."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


class Session(Protocol):
    """A long-lived process (psql, mysql, sqlite3) fed requests one at a time; it holds locks between them."""

    def request(self, text: str, marker: str, timeout: float) -> str:
        """Send `text` (which ends by making the process print `marker`) and return the output before it."""
        ...

    def close(self, timeout: float = 10) -> int: ...


class CommandRunner(Protocol):
    where: str

    def run(
        self, argv: list[str], *, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
    ) -> CommandResult: ...

    def open_session(self, argv: list[str], *, env: dict[str, str] | None = None) -> Session: ...

    def read_file(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...


class HostSession:
    def __init__(self, argv: list[str], env: dict[str, str] | None) -> None:
        self.argv = argv
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        except OSError as exc:
            raise CommandFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._buffer = b""

    def request(self, text: str, marker: str, timeout: float) -> str:
        try:
            self._proc.stdin.write(text.encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise CommandFailed(f"{self.argv[0]} session ended: {self._final_output()}") from None
        deadline = time.monotonic() + timeout
        want = marker.encode()
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while want not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandFailed(f"{self.argv[0]} did not answer within {timeout:.0f} s")
                if sel.select(min(left, 0.5)):
                    data = self._proc.stdout.read()
                    if data:
                        self._buffer += data
                        continue
                if self._proc.poll() is not None and want not in self._buffer:
                    raise CommandFailed(f"{self.argv[0]} session ended: {self._final_output()}")
        before, _, after = self._buffer.partition(want)
        self._buffer = after.lstrip(b"\n")
        return before.decode(errors="replace")

    def _final_output(self) -> str:
        """What the ended process said last, on one line (error messages are shown as one line)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        with contextlib.suppress(OSError, TypeError):
            self._buffer += self._proc.stdout.read() or b""
        return one_line(self._buffer.decode(errors="replace"))[-300:]

    def close(self, timeout: float = 10) -> int:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


class HostRunner:
    """Runs commands on this machine."""

    where = "host"

    def run(
        self, argv: list[str], *, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
    ) -> CommandResult:
        try:
            proc = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
        except FileNotFoundError:
            raise CommandFailed(f"{argv[0]} is not installed here") from None
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"{argv[0]} did not finish within {timeout:.0f} s") from None
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)

    def open_session(self, argv: list[str], *, env: dict[str, str] | None = None) -> Session:
        return HostSession(argv, env)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)
