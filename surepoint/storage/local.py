"""Local-directory backend: one file per object, written to a temporary name, fsynced and renamed."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Iterator

from surepoint.errors import RepositoryExists, RepositoryNotFound, StorageError, StorageFull
from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound, TemporaryInfo

TMP_SUFFIX = ".tmp"


def open_local(location: str, *, create: bool = False) -> LocalBackend:
    """The backend for a local path or file:// URL; with `create`, the directory must be new or empty."""
    path = location.removeprefix("file://")
    if create:
        if os.path.isdir(path) and os.listdir(path):
            if os.path.exists(os.path.join(path, "config")):
                raise RepositoryExists(f"a repository already exists at {path}")
            raise RepositoryExists(f"{path} exists and is not empty: choose a new or empty directory")
        try:
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            os.chmod(path, DIR_MODE)
        except OSError as exc:
            raise StorageError(f"cannot create repository directory {path}: {exc.strerror}") from None
    elif not os.path.isdir(path):
        raise RepositoryNotFound(f"no repository at {path}")
    return LocalBackend(path)


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"repository storage is full while writing {what}: free space and run the job again")
    if exc.errno == errno.EROFS:
        return StorageError(f"repository storage is read-only (writing {what})")
    return StorageError(f"repository storage error writing {what}: {exc.strerror}")


class LocalBackend(Backend):
    """Objects as files under a root directory.

    Files are fsynced before they are renamed into place, so a name never points at partial
    data. Directory entries become durable at `sync()` (the directories touched since the last
    sync are fsynced), which the repository calls before it writes a restore-point manifest.
    Temporary files are named `<object>.<pid>.<thread>.tmp`: a process that no longer exists on
    this host has abandoned its temporaries.
    """

    capabilities = Capabilities(atomic_rename=True, touch_renews_mtime=True)

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        self._dirty_dirs: set[str] = set()
        self._lock = threading.Lock()
        self._made_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        if not name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"bad object name {name!r}")
        return os.path.join(self.root, name)

    def _ensure_dir(self, directory: str) -> bool:
        """Make the directory of an object; True if it was new (its entry becomes durable at the next sync)."""
        if directory in self._made_dirs:
            return False
        missing = []  # the new directories, deepest first: each one's entry lives in its parent
        ancestor = directory
        while not os.path.isdir(ancestor):
            missing.append(ancestor)
            ancestor = os.path.dirname(ancestor)
        if missing:
            os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
            for new in missing:
                os.chmod(new, DIR_MODE)  # makedirs gives the parents it makes the default mode
                self._dirty(os.path.dirname(new))
        self._made_dirs.add(directory)
        return bool(missing)

    def _dirty(self, directory: str) -> None:
        with self._lock:
            self._dirty_dirs.add(directory)

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        except OSError as exc:
            raise StorageError(f"repository storage error reading {name}: {exc.strerror}") from None

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            new_directory = self._ensure_dir(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
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
        except BaseException:
            # Interrupted (a signal, a KeyboardInterrupt, a failed fault hook): the temporary goes
            # too. Only kill -9 or a power cut can leave one, which list_temporary() reports and gc
            # removes once its writer is gone.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_dir(directory)
            if new_directory:
                self.sync()
        else:
            self._dirty(directory)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        except OSError as exc:
            raise _storage_error(exc, name) from None
        self._dirty(os.path.dirname(path))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # walk the deepest directory that holds every name with this prefix, then filter
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(head) if head else self.root
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                if filename.endswith(TMP_SUFFIX):
                    continue
                full = os.path.join(dirpath, filename)
                name = os.path.relpath(full, self.root)
                if not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(name, st.st_size, st.st_mtime)

    def list_temporary(self) -> Iterator[TemporaryInfo]:
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for filename in filenames:
                if filename.endswith(TMP_SUFFIX):
                    full = os.path.join(dirpath, filename)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    name = os.path.relpath(full, self.root)
                    yield TemporaryInfo(name, st.st_size, st.st_mtime, _writer_gone(filename))

    def prepare(self, prefixes: Iterable[str]) -> None:
        made = {self.root}
        try:
            for prefix in prefixes:
                directory = os.path.join(self.root, prefix.strip("/"))
                os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
                self._made_dirs.add(directory)
                while directory not in made:
                    made.add(directory)
                    directory = os.path.dirname(directory)
            for directory in sorted(made, key=len, reverse=True):
                os.chmod(directory, DIR_MODE)  # makedirs gives the parents it makes the default mode
                _fsync_dir(directory)
            _fsync_dir(os.path.dirname(self.root))
        except OSError as exc:
            raise _storage_error(exc, "the repository layout") from None

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        if not os.path.isfile(path):
            raise ObjectNotFound(name)
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def touch(self, name: str) -> bool:
        try:
            os.utime(self._path(name))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def rename(self, name: str, new_name: str) -> None:
        source, dest = self._path(name), self._path(new_name)
        try:
            self._ensure_dir(os.path.dirname(dest))
            os.rename(source, dest)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        except OSError as exc:
            raise _storage_error(exc, new_name) from None
        self._dirty(os.path.dirname(source))
        self._dirty(os.path.dirname(dest))

    def sync(self) -> None:
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        try:
            for directory in sorted(dirs, key=len, reverse=True):
                _fsync_dir(directory)
        except OSError as exc:
            raise _storage_error(exc, "directory entries") from None


# Private by default: objects 0600 in 0700 directories, whatever the umask (os.open and makedirs
# apply the umask, which can only take bits away). A repository shared by a backup group is made
# by hand: chmod -R g+rX and a default ACL, documented in docs/security.md.
FILE_MODE = 0o600
DIR_MODE = 0o700


def _writer_gone(filename: str) -> bool:
    """Is the process that wrote `<object>.<pid>.<thread>.tmp` gone from this host?"""
    parts = filename.rsplit(".", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
