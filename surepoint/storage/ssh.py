"""ssh:// backend: objects on another host, served by `surepoint serve` at the far end of an ssh session.

The client runs `ssh -o BatchMode=yes [-p PORT] [USER@]HOST surepoint serve PATH`; on the server,
sshd usually replaces that command with a forced one from `authorized_keys`
(`surepoint serve --append-only /srv/repo`), which then decides the path and what is allowed.

Wire format (docs/offsite.md): every message is two frames, a JSON header and a data body, each
a 4-byte big-endian length followed by that many bytes. A request header holds "op" and its
arguments; a reply header holds "ok" and either the results or an "error" code and "message".
One request is answered before the next is sent; the client serialises its threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import struct
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from surepoint.errors import (
    InvalidArgument,
    RepositoryExists,
    RepositoryNotFound,
    StorageError,
    StorageFull,
    SurepointError,
)
from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound, TemporaryInfo
from surepoint.storage.local import TMP_SUFFIX

PROTOCOL_VERSION = 1
LENGTH = struct.Struct(">I")
MAX_HEADER = 1 << 20
MAX_BODY = 256 << 20
LIST_PAGE = 5000
MAX_PENDING = 64  # deferred puts in flight; their small replies must fit the pipes, or both ends block

# Error codes of a reply, and what the client makes of them.
NOT_FOUND = "not_found"
EXISTS = "exists"  # hello with create: the location holds something already
REFUSED = "refused"
STORAGE_FULL = "storage_full"
BAD_REQUEST = "bad_request"
FAILED = "failed"


class ProtocolError(StorageError):
    """The other side sent something that is not a well-formed message, or went away."""


class RefusedByServer(StorageError):
    """The server refused a request (an append-only server refuses overwrites and deletions)."""


# framing -----------------------------------------------------------------------------------


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    parts = []
    while size:
        part = stream.read(size)
        if not part:
            raise EOFError
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def read_message(stream: BinaryIO) -> tuple[dict, bytes]:
    """One message (header, body); EOFError at a clean end of stream, ProtocolError on garbage."""
    try:
        (header_size,) = LENGTH.unpack(_read_exact(stream, LENGTH.size))
    except EOFError:
        raise
    try:
        if header_size > MAX_HEADER:
            raise ProtocolError(f"message header of {header_size} bytes is too large")
        raw = _read_exact(stream, header_size)
        (body_size,) = LENGTH.unpack(_read_exact(stream, LENGTH.size))
        if body_size > MAX_BODY:
            raise ProtocolError(f"message body of {body_size} bytes is too large")
        body = _read_exact(stream, body_size)
    except EOFError:
        raise ProtocolError("connection closed in the middle of a message") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise ProtocolError("message header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    return header, body


def write_message(stream: BinaryIO, header: dict, body: bytes = b"") -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    stream.write(LENGTH.pack(len(raw)) + raw + LENGTH.pack(len(body)))
    if body:
        stream.write(body)
    stream.flush()


# locations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshLocation:
    host: str
    path: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, location: str) -> SshLocation:
        """ssh://[user@]host[:port]/path; the path is absolute on the server (`//` not needed)."""
        parts = urlsplit(location)
        if parts.scheme != "ssh" or not parts.hostname:
            raise InvalidArgument(f"{location!r} is not an ssh:// location like ssh://user@host/srv/repo")
        try:
            port = parts.port
        except ValueError:
            raise InvalidArgument(f"{location!r}: the port is not a number") from None
        path = unquote(parts.path)
        if not path or path == "/":
            raise InvalidArgument(f"{location!r} has no repository path: ssh://user@host/srv/repo")
        return cls(parts.hostname, path, unquote(parts.username) if parts.username else None, port)

    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def ssh_command(location: SshLocation) -> list[str]:
    """The command that reaches `surepoint serve` on the server.

    SUREPOINT_SSH_COMMAND replaces plain `ssh` (for an identity file or known-hosts options);
    SUREPOINT_REMOTE_PATH names the surepoint program on the server when no forced command does.
    """
    base = shlex.split(os.environ.get("SUREPOINT_SSH_COMMAND") or "ssh")
    cmd = [*base, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30"]
    if location.port:
        cmd += ["-p", str(location.port)]
    remote = os.environ.get("SUREPOINT_REMOTE_PATH") or "surepoint"
    cmd += ["--", location.destination(), f"{shlex.quote(remote)} serve {shlex.quote(location.path)}"]
    return cmd


# the backend -------------------------------------------------------------------------------


class SshBackend(Backend):
    """A repository on another host, reached through one ssh session per backend object.

    `capabilities.append_only` is what the server announced: such a server keeps everything it
    has and takes only new objects (plus this session's own lock objects), so forgetting and
    garbage collection have to run on the server itself.
    """

    def __init__(self, location: str, *, create: bool = False, command: list[str] | None = None) -> None:
        self.remote = SshLocation.parse(location)
        self.location = location
        self._command = command or ssh_command(self.remote)
        self._lock = threading.Lock()
        self._pending: deque[dict] = deque()  # headers of deferred puts whose replies are unread
        self._deferred_failure: SurepointError | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        try:
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C reaches us, not ssh: we close the session ourselves
            )
        except OSError as exc:
            raise SurepointError(f"cannot run {self._command[0]}: {exc.strerror}") from None
        self._stderr_reader = threading.Thread(target=self._read_stderr, name="ssh-stderr", daemon=True)
        self._stderr_reader.start()
        try:
            hello = self._call({"op": "hello", "version": PROTOCOL_VERSION, "create": create})[0]
        except ObjectNotFound:
            self.close()
            raise RepositoryNotFound(f"no repository at {location}") from None
        except SurepointError:
            self.close()
            raise
        self.append_only: bool = bool(hello.get("append_only"))
        self.capabilities = Capabilities(atomic_rename=True, touch_renews_mtime=True, append_only=self.append_only)
        self.server_root: str = str(hello.get("root", ""))

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                self._stderr_tail.append(text)

    def _lost(self, what: str) -> SurepointError:
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr_reader.join(timeout=2)
        detail = "; ".join(self._stderr_tail) or f"ssh exited with status {self._proc.returncode}"
        return SurepointError(f"{what} {self.location}: {detail}")

    def _send(self, header: dict, body: bytes) -> None:
        try:
            assert self._proc.stdin is not None
            write_message(self._proc.stdin, header, body)
        except (BrokenPipeError, OSError, ValueError):
            raise self._lost("lost the connection to") from None

    def _receive(self, op: str) -> tuple[dict, bytes]:
        try:
            assert self._proc.stdout is not None
            reply, data = read_message(self._proc.stdout)
            if op == "list":
                pages = [data]
                while reply.get("ok") and reply.get("more"):
                    reply, data = read_message(self._proc.stdout)
                    pages.append(data)
                data = b"\n".join(pages)
        except (EOFError, ProtocolError, OSError, ValueError):
            what = "cannot reach the repository server at" if op == "hello" else "lost the connection to"
            raise self._lost(what) from None
        return reply, data

    def _drain(self) -> None:
        """Read the replies of deferred puts; keep the first failure for `sync` (lock held)."""
        while self._pending:
            header = self._pending.popleft()
            reply, _ = self._receive("put")
            if not reply.get("ok") and self._deferred_failure is None:
                self._deferred_failure = self._error(header, reply)

    def _call(self, header: dict, body: bytes = b"") -> tuple[dict, bytes]:
        with self._lock:
            self._drain()
            self._send(header, body)
            reply, data = self._receive(header["op"])
        if reply.get("ok"):
            return reply, data
        raise self._error(header, reply)

    def _error(self, header: dict, reply: dict) -> SurepointError:
        code, message = reply.get("error"), str(reply.get("message", "request failed"))
        if code == NOT_FOUND:
            return ObjectNotFound(header.get("name", ""))
        if code == REFUSED:
            return RefusedByServer(f"{self.location}: {message}")
        if code == EXISTS:
            return RepositoryExists(f"{self.location}: {message}")
        if code == STORAGE_FULL:
            return StorageFull(f"{self.location}: {message}")
        return StorageError(f"{self.location}: {message}")

    # Backend interface ---------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        return self._call({"op": "get", "name": name})[1]

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        header = {"op": "put", "name": name, "durable": durable}
        if durable:
            self._call(header, data)
            return
        # Deferred: sent now, its reply read later (pipelining hides the round trip); a failure
        # is raised by sync() at the latest, as the contract allows.
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._drain()
            self._send(header, data)
            self._pending.append(header)

    def exists(self, name: str) -> bool:
        return bool(self._call({"op": "exists", "name": name})[0]["exists"])

    def delete(self, name: str) -> None:
        if name.endswith(TMP_SUFFIX):  # a leftover that list_temporary reported
            self._call({"op": "delete_temporary", "name": name})
            return
        self._call({"op": "delete", "name": name})

    def list_temporary(self) -> Iterator[TemporaryInfo]:
        """Temporaries a killed server left in the repository directory (none from a server without the request)."""
        try:
            _reply, data = self._call({"op": "list_temporary"})
        except SurepointError:
            return iter(())
        rows = [json.loads(line) for line in data.splitlines() if line]
        return iter([TemporaryInfo(n, s, m, bool(g)) for n, s, m, g in rows])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Read every page before yielding: the session carries one request at a time.
        _reply, data = self._call({"op": "list", "prefix": prefix})
        entries = [ObjectInfo(n, s, m) for n, s, m in (json.loads(line) for line in data.splitlines() if line)]
        yield from entries

    def stat(self, name: str) -> ObjectInfo:
        reply = self._call({"op": "stat", "name": name})[0]
        return ObjectInfo(name, reply["size"], reply["mtime"])

    def touch(self, name: str) -> bool:
        return bool(self._call({"op": "touch", "name": name})[0]["exists"])

    def rename(self, name: str, new_name: str) -> None:
        self._call({"op": "rename", "name": name, "new_name": new_name})

    def prepare(self, prefixes: Iterable[str]) -> None:
        self._call({"op": "prepare", "prefixes": list(prefixes)})

    def sync(self) -> None:
        self._call({"op": "sync"})
        with self._lock:
            failure, self._deferred_failure = self._deferred_failure, None
        if failure is not None:
            raise failure

    def after_fork(self) -> None:
        """A session of our own: the parent's ssh process and its pipes stay the parent's."""
        inherited = self._proc
        for stream in (inherited.stdin, inherited.stdout, inherited.stderr):
            if stream is not None:
                # Not stream.close(): the parent's stderr reader held that stream's lock at the fork,
                # and no thread of ours will ever release it. The stream objects are kept, never
                # collected, so they cannot close a later file that reuses the number.
                with contextlib.suppress(OSError):
                    os.close(stream.fileno())
        self._inherited = inherited
        self._proc = None
        self.__init__(self.location, command=self._command)

    def close(self) -> None:
        """End the session: the server sees end of input and exits."""
        proc = self._proc
        if proc.poll() is None:
            try:
                with self._lock:
                    with contextlib.suppress(SurepointError):
                        self._drain()
                    assert proc.stdin is not None
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
