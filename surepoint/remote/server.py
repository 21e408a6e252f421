"""The server side of ssh:// repositories: answer the requests of one client session on stdin/stdout.

sshd starts `surepoint serve [--append-only] PATH` for each session (usually as a forced command
in authorized_keys). In append-only mode the session may add objects but never change or remove
one that exists; the one exception is its own lock objects, which it must be able to refresh and
remove (docs/offsite.md, "What the client's key can do").
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

from surepoint.errors import RepositoryExists, RepositoryNotFound, StorageFull, SurepointError
from surepoint.storage.backend import ObjectNotFound
from surepoint.storage.local import TMP_SUFFIX, LocalBackend, open_local
from surepoint.storage.ssh import (
    BAD_REQUEST,
    EXISTS,
    FAILED,
    LIST_PAGE,
    NOT_FOUND,
    PROTOCOL_VERSION,
    REFUSED,
    STORAGE_FULL,
    ProtocolError,
    read_message,
    write_message,
)

# What an append-only client may create. Anything else (trash/, unknown names) is refused.
CONFIG = "config"
NEW_ONLY_PREFIXES = ("indexes/", "restorepoints/")
CHUNK_PREFIX = "chunks/"
LOCK_PREFIX = "locks/"


class Refused(SurepointError):
    """A request the server's mode does not allow."""


class BadRequest(SurepointError):
    """A request that is not one the protocol knows, or lacks its arguments."""


class Session:
    """One client's session on a repository directory."""

    def __init__(self, root: str, *, append_only: bool) -> None:
        self.root = os.path.abspath(root)
        self.append_only = append_only
        self.backend: LocalBackend | None = None
        self.own_locks: set[str] = set()
        self.dirty_dirs: set[str] = set()

    # session start ---------------------------------------------------------------------

    def hello(self, request: dict) -> dict:
        if request.get("version") != PROTOCOL_VERSION:
            raise BadRequest(f"protocol version {request.get('version')!r} is not supported (server speaks 1)")
        try:
            self.backend = open_local(self.root, create=bool(request.get("create")))
        except RepositoryNotFound:
            raise ObjectNotFound(self.root) from None
        return {"version": PROTOCOL_VERSION, "append_only": self.append_only, "root": self.root}

    # requests --------------------------------------------------------------------------

    def handle(self, request: dict, body: bytes) -> tuple[dict, bytes]:
        op = request.get("op")
        if op == "hello":
            return self.hello(request), b""
        if self.backend is None:
            raise BadRequest("the session has not started (hello first)")
        handler: Callable[[dict, bytes], tuple[dict, bytes]] | None = getattr(self, f"op_{op}", None)
        if not isinstance(op, str) or handler is None:
            raise BadRequest(f"unknown request {op!r}")
        return handler(request, body)

    def _name(self, request: dict, key: str = "name") -> str:
        name = request.get(key)
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
            raise BadRequest(f"bad object name {name!r}")
        if name.endswith(TMP_SUFFIX):
            raise BadRequest(f"bad object name {name!r}")
        return name

    def op_get(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        return {}, self.backend.get(self._name(request))

    def op_exists(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        return {"exists": self.backend.exists(self._name(request))}, b""

    def op_stat(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        info = self.backend.stat(self._name(request))
        return {"size": info.size, "mtime": info.mtime}, b""

    def op_touch(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        # Allowed in both modes: a newer mtime only makes garbage collection keep an object longer.
        return {"exists": self.backend.touch(self._name(request))}, b""

    def op_prepare(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        # Allowed in both modes: it only makes directories.
        prefixes = request.get("prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise BadRequest("prepare needs a list of prefixes")
        for prefix in prefixes:
            self._name({"name": prefix.rstrip("/")})
        self.backend.prepare(prefixes)
        return {}, b""

    def op_sync(self, _request: dict, _body: bytes) -> tuple[dict, bytes]:
        self.backend.sync()
        dirs, self.dirty_dirs = self.dirty_dirs, set()
        for directory in dirs:
            _fsync_dir(directory)
        return {}, b""

    def op_put(self, request: dict, body: bytes) -> tuple[dict, bytes]:
        name = self._name(request)
        durable = bool(request.get("durable", True))
        if not self.append_only:
            self.backend.put(name, body, durable=durable)
            return {}, b""
        if name.startswith(LOCK_PREFIX) and name in self.own_locks:
            self.backend.put(name, body, durable=durable)  # refreshing this session's own lock
            return {}, b""
        if name.startswith(CHUNK_PREFIX) and self.backend.touch(name):
            # Content-addressed: the stored chunk is the one asked for; keep it, untouched but for its mtime.
            return {"kept": True}, b""
        if not (name == CONFIG or name.startswith((CHUNK_PREFIX, LOCK_PREFIX, *NEW_ONLY_PREFIXES))):
            raise Refused(f"append-only repository: objects named {name!r} cannot be written by a client")
        directory = put_new(self.root, name, body)
        if durable:
            _fsync_dir(directory)
        else:
            self.dirty_dirs.add(directory)
        if name.startswith(LOCK_PREFIX):
            self.own_locks.add(name)
        return {}, b""

    def op_delete(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        name = self._name(request)
        if self.append_only and name not in self.own_locks:
            raise Refused(
                f"append-only repository: {name} cannot be deleted by a client "
                "(forgetting and garbage collection run on the server)"
            )
        self.backend.delete(name)
        self.own_locks.discard(name)
        return {}, b""

    def op_rename(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        name, new_name = self._name(request), self._name(request, "new_name")
        if self.append_only:
            raise Refused(
                f"append-only repository: {name} cannot be moved by a client (garbage collection runs on the server)"
            )
        self.backend.rename(name, new_name)
        return {}, b""

    def op_list_temporary(self, _request: dict, _body: bytes) -> tuple[dict, bytes]:
        """Leftovers of interrupted writes (a killed server's), for the client's gc."""
        entries = [json.dumps([t.name, t.size, t.mtime, t.writer_gone]) for t in self.backend.list_temporary()]
        return {}, "\n".join(entries).encode()

    def op_delete_temporary(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        name = request.get("name")
        if (
            not isinstance(name, str)
            or not name.endswith(TMP_SUFFIX)
            or name.startswith("/")
            or ".." in name.split("/")
        ):
            raise BadRequest(f"bad temporary name {name!r}")
        if self.append_only:
            raise Refused("append-only repository: temporaries are removed by garbage collection on the server")
        self.backend.delete(name)
        return {}, b""

    def op_list(self, request: dict, _body: bytes) -> tuple[dict, bytes]:
        raise AssertionError("list is answered by serve() in pages")  # pragma: no cover

    def list_pages(self, request: dict):
        prefix = request.get("prefix", "")
        if not isinstance(prefix, str) or prefix.startswith("/") or ".." in prefix.split("/"):
            raise BadRequest(f"bad prefix {prefix!r}")
        page: list[bytes] = []
        for info in self.backend.list(prefix):
            page.append(json.dumps([info.name, info.size, info.mtime]).encode())
            if len(page) >= LIST_PAGE:
                yield b"\n".join(page)
                page = []
        yield b"\n".join(page)


def put_new(root: str, name: str, data: bytes) -> str:
    """Create an object that must not exist yet: the file is linked into place, which fails if the name is taken.

    Returns its directory, whose entry becomes durable when that directory is fsynced.
    """
    path = os.path.join(root, name)  # name checked by Session._name
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise Refused(f"append-only repository: {name} exists and cannot be overwritten") from None
    except OSError as exc:
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise StorageFull(f"repository storage is full while writing {name}") from None
        raise SurepointError(f"repository storage error writing {name}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return directory


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _error_reply(exc: BaseException) -> dict:
    if isinstance(exc, ObjectNotFound):
        return {"ok": False, "error": NOT_FOUND, "message": str(exc)}
    if isinstance(exc, RepositoryExists):
        return {"ok": False, "error": EXISTS, "message": str(exc)}
    if isinstance(exc, Refused):
        return {"ok": False, "error": REFUSED, "message": str(exc)}
    if isinstance(exc, StorageFull):
        return {"ok": False, "error": STORAGE_FULL, "message": str(exc)}
    if isinstance(exc, (BadRequest, ValueError)):
        return {"ok": False, "error": BAD_REQUEST, "message": str(exc)}
    return {"ok": False, "error": FAILED, "message": str(exc)}


def serve(root: str, *, append_only: bool, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until the client closes its end."""
    session = Session(root, append_only=append_only)
    while True:
        try:
            request, body = read_message(stdin)
        except EOFError:
            return
        except ProtocolError as exc:
            write_message(stdout, {"ok": False, "error": BAD_REQUEST, "message": str(exc)})
            return
        try:
            if request.get("op") == "list" and session.backend is not None:
                pages = list(session.list_pages(request))
                for number, page in enumerate(pages):
                    write_message(stdout, {"ok": True, "more": number < len(pages) - 1}, page)
                continue
            reply, data = session.handle(request, body)
        except (SurepointError, ObjectNotFound, ValueError, OSError) as exc:
            write_message(stdout, _error_reply(exc))
            continue
        write_message(stdout, {"ok": True, **reply}, data)
