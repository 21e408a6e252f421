"""A client for qemu-guest-agent over its chardev unix socket (virtserialport org.qemu.guest_agent.0).

Used to quiesce the guest around the instant of a point-in-time view (fsfreeze) and to run programs
in the guest (guest-exec with argument vectors, never a shell string). Every call has a timeout:
an agent that is absent or hung gives GuestAgentUnavailable / GuestAgentTimeout, not a stuck backup.

The chardev socket carries one byte stream that outlives our connection, so replies to earlier,
timed-out commands may still arrive. The connection starts with the guest-sync-delimited handshake
(0xFF resets the agent's parser; the reply comes after a 0xFF sentinel) and every command carries
an "id" that its reply echoes, so stale replies are recognised and dropped.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from surepoint.vm.errors import (
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeout,
    GuestAgentUnavailable,
    GuestCommandFailed,
)

SENTINEL = b"\xff"
DEFAULT_TIMEOUT = 10.0
FILE_CHUNK = 1 << 20  # guest-file-read/write chunk: well under the agent's JSON size limits


@dataclass(frozen=True)
class ExecResult:
    """How a program run with guest-exec ended, and what it printed."""

    pid: int
    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.signal is None and self.exitcode == 0


class GuestAgent:
    """One session with qemu-guest-agent. Connects and syncs on creation; use as a context manager."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, sync_timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._connect()
        try:
            self.sync(timeout if sync_timeout is None else sync_timeout)
        except GuestAgentTimeout:
            self.close()
            raise GuestAgentUnavailable(
                f"no guest agent answers on {path!r} (qemu-guest-agent not running in the guest?)"
            ) from None
        except BaseException:
            self.close()
            raise

    # -- connection -----------------------------------------------------------------------

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r}: {exc.strerror}") from None
        except TimeoutError:
            sock.close()
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r}: connect timed out") from None
        except OSError as exc:
            sock.close()
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r}: {exc}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise GuestAgentError("guest agent connection is closed")
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except TimeoutError:
            raise GuestAgentTimeout(f"guest agent socket {self.path!r}: send timed out") from None
        except OSError as exc:
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r}: send failed: {exc}") from None

    def _fill(self, deadline: float) -> None:
        """Read more bytes into the buffer, or raise GuestAgentTimeout at the deadline."""
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestAgentTimeout("guest agent did not answer in time")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(1 << 16)
        except TimeoutError:
            raise GuestAgentTimeout("guest agent did not answer in time") from None
        except OSError as exc:
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r}: {exc}") from None
        if not data:
            raise GuestAgentUnavailable(f"guest agent socket {self.path!r} was closed by QEMU")
        self._buf += data

    def _next_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object of the stream; the agent ends each reply with a newline."""
        while True:
            while b"\n" not in self._buf:
                self._fill(deadline)
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.lstrip(SENTINEL).strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # garbage on the channel: not a reply of ours
            if isinstance(msg, dict):
                return msg

    # -- protocol -------------------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """guest-sync-delimited handshake: flush the agent's parser and our stream of stale replies."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        token = random.randrange(1, 2**31)
        self._buf = b""
        self._send(SENTINEL + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        self._send(b"\n")
        while True:
            while SENTINEL not in self._buf:
                self._buf = b""
                self._fill(deadline)
            self._buf = self._buf.split(SENTINEL, 1)[1]
            msg = self._next_message(deadline)
            if msg.get("return") == token:
                return

    def execute(self, command: str, args: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run one agent command and return its result; errors and timeouts raise GuestAgentError."""
        msg_id = f"sp-{os.getpid()}-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": msg_id}
        if args:
            request["arguments"] = dict(args)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self._send(json.dumps(request).encode() + b"\n")
        while True:
            try:
                reply = self._next_message(deadline)
            except GuestAgentTimeout:
                raise GuestAgentTimeout(f"guest agent did not answer {command} within {wait:g} s") from None
            if reply.get("id") != msg_id:
                continue  # a late reply to an earlier command that timed out
            if "error" in reply:
                err = reply["error"]
                raise GuestAgentCommandError(command, err.get("class", "?"), err.get("desc", ""))
            return reply.get("return")

    def ping(self, timeout: float | None = None) -> None:
        """guest-ping: raises if the agent does not answer."""
        self.execute("guest-ping", timeout=timeout)

    def info(self) -> dict[str, Any]:
        """guest-info: agent version and the commands it supports."""
        return self.execute("guest-info")

    # -- filesystem freeze ----------------------------------------------------------------

    def fsfreeze_status(self, timeout: float | None = None) -> str:
        """'thawed' or 'frozen'."""
        return self.execute("guest-fsfreeze-status", timeout=timeout)

    def fsfreeze_freeze(self, timeout: float = 60.0, thaw_timeout: float = 30.0) -> int:
        """Freeze the guest's filesystems; returns how many were frozen.

        If the freeze fails or times out, a thaw is still sent (the agent runs commands in order, so
        it thaws as soon as the freeze is done) before the error is raised: a guest must never be
        left frozen by a failed backup.
        """
        try:
            return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))
        except GuestAgentError as exc:
            with contextlib.suppress(GuestAgentError):
                self.fsfreeze_thaw(timeout=thaw_timeout)
            raise exc

    def fsfreeze_thaw(self, timeout: float = 30.0) -> int:
        """Thaw the guest's filesystems; returns how many were thawed."""
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    @contextlib.contextmanager
    def frozen(self, timeout: float = 60.0, thaw_timeout: float = 30.0) -> Iterator[int]:
        """Keep the guest's filesystems frozen for the body of a with-block, thawing even on error."""
        count = self.fsfreeze_freeze(timeout=timeout, thaw_timeout=thaw_timeout)
        try:
            yield count
        finally:
            self.fsfreeze_thaw(timeout=thaw_timeout)

    # -- running programs -----------------------------------------------------------------

    def exec_start(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = True,
    ) -> int:
        """Start a program in the guest (argv[0] is looked up in PATH); returns its guest pid."""
        if isinstance(argv, str | bytes) or not argv:
            raise ValueError("argv must be a non-empty sequence of strings, not a shell string")
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        return int(self.execute("guest-exec", args)["pid"])

    def exec_status(self, pid: int) -> dict[str, Any]:
        """guest-exec-status of a started program (its output is returned once, when it exited)."""
        return self.execute("guest-exec-status", {"pid": pid})

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> ExecResult:
        """Run a program in the guest and wait for it; GuestCommandFailed if check and it failed."""
        pid = self.exec_start(argv, input=input, env=env)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.exec_status(pid)
            if status.get("exited"):
                break
            if time.monotonic() + delay > deadline:
                raise GuestAgentTimeout(f"guest command {list(argv)!r} (pid {pid}) still runs after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        result = ExecResult(
            pid=pid,
            exitcode=status.get("exitcode"),
            signal=status.get("signal"),
            stdout=base64.b64decode(status.get("out-data", "")),
            stderr=base64.b64decode(status.get("err-data", "")),
            truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
        )
        if check and not result.ok:
            raise GuestCommandFailed(list(argv), result.exitcode, result.signal, result.stderr)
        return result

    # -- files ----------------------------------------------------------------------------

    def file_open(self, path: str, mode: str = "r") -> int:
        """guest-file-open; mode as for fopen ('r', 'w', 'a', 'r+', with 'b' optional)."""
        return int(self.execute("guest-file-open", {"path": path, "mode": mode}))

    def file_read(self, handle: int, count: int = FILE_CHUNK) -> tuple[bytes, bool]:
        """Read up to count bytes; returns (data, eof)."""
        reply = self.execute("guest-file-read", {"handle": handle, "count": count})
        return base64.b64decode(reply.get("buf-b64", "")), bool(reply.get("eof"))

    def file_write(self, handle: int, data: bytes) -> int:
        """Write bytes at the current position; returns how many were written."""
        reply = self.execute("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
        return int(reply.get("count", 0))

    def file_close(self, handle: int) -> None:
        self.execute("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        """The whole content of a guest file."""
        handle = self.file_open(path, "rb")
        try:
            parts = []
            while True:
                data, eof = self.file_read(handle)
                parts.append(data)
                if eof or not data:
                    return b"".join(parts)
        finally:
            self.file_close(handle)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace a guest file with `data`.

        A file this creates is readable and writable by every user of the guest (qemu-ga gives new
        files mode 0666): create only in a private directory, or replace files that exist.
        """
        handle = self.file_open(path, "wb")
        try:
            view = memoryview(data)
            while view:
                written = self.file_write(handle, bytes(view[:FILE_CHUNK]))
                if written <= 0:
                    raise GuestAgentError(f"guest-file-write to {path!r} wrote nothing")
                view = view[written:]
        finally:
            self.file_close(handle)
