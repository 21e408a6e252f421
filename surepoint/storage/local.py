"""Local-directory backend: one file per object, written to a temporary name, fsynced and renamed."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator

from surepoint.errors import StorageError, StorageFull
from surepoint.storage.backend import ObjectInfo, ObjectNotFound

TMP_SUFFIX = ".tmp"


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"repository storage is full while writing {what}: free space and run the job again")
    if exc.errno == errno.EROFS:
        return StorageError(f"repository storage is read-only (writing {what})")
    return StorageError(f"repository storage error writing {what}: {exc.strerror}")


class LocalBackend:
    """Objects as files under a root directory.

    Files are fsynced before they are renamed into place, so a name never points at partial
    data. Directory entries become durable at `sync()` (the directories touched since the last
    sync are fsynced), which the repository calls before it writes a restore-point manifest.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        self._dirty_dirs: set[str] = set()
        self._lock = threading.Lock()
        self._made_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return os.path.join(self.root, name)

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage_error(exc, name) from None
        if durable:
            _fsync_dir(directory)
        else:
            with self._lock:
                self._dirty_dirs.add(directory)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                if filename.endswith(TMP_SUFFIX):
                    continue
                full = os.path.join(dirpath, filename)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(os.path.relpath(full, self.root), st.st_size, st.st_mtime)

    def list_temporary(self) -> Iterator[ObjectInfo]:
        """Leftover temporary files of interrupted writes (garbage collection removes old ones)."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for filename in filenames:
                if filename.endswith(TMP_SUFFIX):
                    full = os.path.join(dirpath, filename)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(os.path.relpath(full, self.root), st.st_size, st.st_mtime)

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def touch(self, name: str) -> bool:
        try:
            os.utime(self._path(name))
            return True
        except FileNotFoundError:
            return False

    def rename(self, name: str, new_name: str) -> None:
        dest = self._path(new_name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(self._path(name), dest)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def sync(self) -> None:
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for directory in dirs:
            _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
