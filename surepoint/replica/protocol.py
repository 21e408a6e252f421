"""Replication over ssh: `surepoint replica receive ROOT` on the replica's host, and its client.

The client runs `ssh -o BatchMode=yes [-p PORT] [USER@]HOST surepoint replica receive ROOT` and
speaks on the session's stdin/stdout in the framing of the repository protocol (docs/offsite.md):
every message is a JSON header and a data body, each a 4-byte big-endian length and that many
bytes. A request header has "op"; a reply header has "ok" and the results, or "error" (the error's
class name), "message" and "exit_code".

    hello     {version, name, vm, source}     -> {replica_id, path, latest, sizes, notes}
    begin     {point_id, sizes}               -> {}
    seed      {repository, point, devices}    -> {restore_point, bitmap, seeded}
    checksums {device, offset, length, block} -> {} + body: 16-byte BLAKE2b digests, one per block
    write     {device, offset} + body: data   -> no reply
    zero      {device, offset, length}        -> no reply
    commit    {point, keep}                   -> {point, dropped, notes}
    abort     {}                              -> {}
    list      {name?}                         -> {replicas}
    forget    {name, points}                  -> {forgotten}
    remove    {name}                          -> {}

`write` and `zero` are not answered, so the sender streams them without waiting a round trip; a
failure among them is kept and returned by the next request that is answered (the receiver skips
the writes that follow it). One session (`hello`) per connection; the end of the connection
aborts an unfinished cycle, and the lock goes with the process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from surepoint import errors as core_errors
from surepoint.errors import InvalidArgument, SurepointError
from surepoint.replica import errors as replica_errors
from surepoint.replica.errors import ReplicaTransportError
from surepoint.replica.receiver import ReplicaSession
from surepoint.replica.site import LocalSite
from surepoint.storage.ssh import ProtocolError, SshLocation, read_message, write_message

VERSION = 1
UNANSWERED = ("write", "zero")


# -- the receiving end --------------------------------------------------------------------------


def serve(root: str, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer one client on stdin/stdout until it says bye or goes away."""
    site = LocalSite(root)
    session: ReplicaSession | None = None
    failure: SurepointError | None = None  # of an unanswered write, told at the next answered request
    try:
        while True:
            try:
                header, body = read_message(stdin)
            except EOFError:
                return
            op = header.get("op")
            if op in UNANSWERED:
                if failure is None:
                    try:
                        if session is None:
                            raise InvalidArgument("no replica is open")
                        if op == "write":
                            session.write(str(header["device"]), int(header["offset"]), body)
                        else:
                            session.zero(str(header["device"]), int(header["offset"]), int(header["length"]))
                    except SurepointError as exc:
                        failure = exc
                continue
            if op == "bye":
                write_message(stdout, {"ok": True})
                return
            reply: dict[str, Any] = {"ok": True}
            data = b""
            try:
                if failure is not None:
                    raise failure
                if op == "hello":
                    if int(header.get("version", 0)) != VERSION:
                        raise InvalidArgument(f"replication protocol version {header.get('version')} is not {VERSION}")
                    if session is not None:
                        raise InvalidArgument("a replica is open already on this connection")
                    session = site.session(str(header["name"]))
                    try:
                        reply.update(session.open(str(header["vm"]), header["source"]))
                    except BaseException:
                        session = None
                        raise
                elif op in ("list", "forget", "remove"):
                    if op == "list":
                        reply["replicas"] = site.list(header.get("name"))
                    elif op == "forget":
                        reply["forgotten"] = site.forget(str(header["name"]), [str(p) for p in header["points"]])
                    else:
                        site.remove(str(header["name"]))
                else:
                    if session is None:
                        raise InvalidArgument("no replica is open")
                    if op == "begin":
                        session.begin(str(header["point_id"]), {str(k): int(v) for k, v in header["sizes"].items()})
                    elif op == "seed":
                        reply.update(
                            session.seed_from(str(header["repository"]), str(header["point"]), list(header["devices"]))
                        )
                    elif op == "checksums":
                        data = session.checksums(
                            str(header["device"]), int(header["offset"]), int(header["length"]), int(header["block"])
                        )
                    elif op == "commit":
                        reply.update(session.commit(dict(header["point"]), int(header["keep"])))
                    elif op == "abort":
                        session.abort()
                    else:
                        raise InvalidArgument(f"unknown request {op!r}")
            except SurepointError as exc:
                failure = None
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}
            except (KeyError, TypeError, ValueError) as exc:
                reply = {
                    "ok": False,
                    "error": "InvalidArgument",
                    "message": f"malformed request: {exc}",
                    "exit_code": 2,
                }
            write_message(stdout, reply, data)
    except (BrokenPipeError, ProtocolError):
        return
    finally:
        if session is not None:
            session.close()


# -- the sending end ----------------------------------------------------------------------------


def receive_command(location: SshLocation) -> list[str]:
    """ssh to the replica's host running `surepoint replica receive PATH` (SUREPOINT_SSH_COMMAND and
    SUREPOINT_REMOTE_PATH as for ssh:// repositories)."""
    base = shlex.split(os.environ.get("SUREPOINT_SSH_COMMAND") or "ssh")
    cmd = [*base, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if location.port:
        cmd += ["-p", str(location.port)]
    remote = os.environ.get("SUREPOINT_REMOTE_PATH") or "surepoint"
    return [*cmd, "--", location.destination(), f"{shlex.quote(remote)} replica receive {shlex.quote(location.path)}"]


class Connection:
    """One ssh session to `surepoint replica receive`."""

    def __init__(self, location: str, command: list[str] | None = None) -> None:
        self.location = location
        self.remote = SshLocation.parse(location)
        argv = command or receive_command(self.remote)
        self._stderr: deque[str] = deque(maxlen=20)
        self._answered = False
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            raise ReplicaTransportError(f"cannot run {argv[0]}: {exc.strerror}") from None
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                self._stderr.append(text)

    def _lost(self, what: str) -> ReplicaTransportError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        detail = "; ".join(self._stderr) or f"ssh exited with status {self.proc.returncode}"
        return ReplicaTransportError(f"{what} {self.location}: {detail}")

    def _failure(self) -> str:
        # ssh that could not connect may be gone before the first request is even written
        return "lost the connection to" if self._answered else "cannot reach the replica's host at"

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        try:
            assert self.proc.stdin is not None
            write_message(self.proc.stdin, header, body)
        except (OSError, ValueError):
            raise self._lost(self._failure()) from None

    def call(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        self.send(header, body)
        try:
            assert self.proc.stdout is not None
            reply, data = read_message(self.proc.stdout)
        except (EOFError, ProtocolError, OSError, ValueError):
            raise self._lost(self._failure()) from None
        self._answered = True
        if reply.get("ok"):
            return reply, data
        raise _error(reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(SurepointError):
                self.call({"op": "bye"})
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _error(reply: dict[str, Any]) -> SurepointError:
    name = str(reply.get("error", ""))
    message = str(reply.get("message", "request failed"))
    cls = getattr(replica_errors, name, None) or getattr(core_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, SurepointError):
        with contextlib.suppress(TypeError):  # a class whose constructor wants more than a message
            return cls(message)
    error = ReplicaTransportError(f"the replica's host: {message}")
    error.exit_code = int(reply.get("exit_code", 1))
    return error


def _results(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "ok"}


class RemoteSession:
    """A ReplicaSession on the replica's host, over its own ssh connection."""

    def __init__(self, location: str, name: str, command: list[str] | None = None) -> None:
        self.conn = Connection(location, command)
        self.name = name

    def open(self, vm: str, source: dict[str, Any]) -> dict[str, Any]:
        reply, _ = self.conn.call({"op": "hello", "version": VERSION, "name": self.name, "vm": vm, "source": source})
        return _results(reply)

    def begin(self, point_id: str, sizes: dict[str, int]) -> None:
        self.conn.call({"op": "begin", "point_id": point_id, "sizes": sizes})

    def seed_from(
        self, repository: str, point: str, devices: list[str], passphrase: Callable[[], str] | None = None
    ) -> dict[str, Any]:
        """The repository is opened on the replica's host, with the passphrase of its environment."""
        reply, _ = self.conn.call({"op": "seed", "repository": repository, "point": point, "devices": devices})
        return _results(reply)

    def checksums(self, device: str, offset: int, length: int, block: int) -> bytes:
        header = {"op": "checksums", "device": device, "offset": offset, "length": length, "block": block}
        return self.conn.call(header)[1]

    def write(self, device: str, offset: int, data: bytes) -> None:
        self.conn.send({"op": "write", "device": device, "offset": offset}, data)

    def zero(self, device: str, offset: int, length: int) -> None:
        self.conn.send({"op": "zero", "device": device, "offset": offset, "length": length})

    def commit(self, point: dict[str, Any], keep: int) -> dict[str, Any]:
        reply, _ = self.conn.call({"op": "commit", "point": point, "keep": keep})
        return _results(reply)

    def abort(self) -> None:
        with contextlib.suppress(SurepointError):
            self.conn.call({"op": "abort"})

    def close(self) -> None:
        self.conn.close()


class RemoteSite:
    """Replicas in a directory of another host, reached with ssh."""

    def __init__(self, location: str, command: list[str] | None = None) -> None:
        SshLocation.parse(location)  # InvalidArgument early for a malformed location
        self.location = location
        self.command = command  # instead of ssh (tests)
        self._conn: Connection | None = None

    def session(self, name: str) -> RemoteSession:
        return RemoteSession(self.location, name, self.command)

    def _call(self, header: dict[str, Any]) -> dict[str, Any]:
        if self._conn is None:
            self._conn = Connection(self.location, self.command)
        return self._conn.call(header)[0]

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        return list(self._call({"op": "list", "name": name})["replicas"])

    def forget(self, name: str, point_ids: list[str]) -> list[str]:
        return list(self._call({"op": "forget", "name": name, "points": point_ids})["forgotten"])

    def remove(self, name: str) -> None:
        self._call({"op": "remove", "name": name})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
