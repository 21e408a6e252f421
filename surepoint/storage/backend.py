"""The storage-backend contract every repository backend keeps (local directory, memory, S3, ssh...).

A backend stores named objects in a flat namespace. It knows nothing of chunks, indexes or
restore points: the repository (surepoint/repo/) decides what the names mean. Every rule below is
checked for every backend by the conformance suite in tests/storage/suite.py.

Names
    '/'-separated relative paths of printable ASCII ("chunks/ab/ab12...", "locks/0f3e..."); never
    absolute, never with an empty, "." or ".." component. A backend may refuse other names with
    ValueError (a programming error, not a user's).

Not found
    Every operation on a name that does not exist raises `ObjectNotFound` (from surepoint.errors),
    the single not-found error of all backends, except `exists` (False) and `touch` (False). The
    repository turns it into a `DamagedData` naming what is missing where an object must exist.

Other failures
    Raise a `StorageError` (`StorageFull` when out of space) with a one-line message naming the
    location and the object; never a raw OSError or library exception.

Writing
    `put` is atomic: a reader sees the whole object or no object, never a prefix, even if the
    writer dies midway. `put` of an existing name replaces it atomically (a reader sees the old
    or the new content). The repository overwrites only `config` and its own lock objects; chunks
    and indexes are content-addressed or uniquely named, so a second put of them carries the same
    bytes.

Durability
    A `put(durable=True)` that returns has made the object survive a crash or power loss. Objects
    put with durable=False become durable at the next `sync()`: when `sync()` returns, every object
    put before it (by this backend object) survives. A failed write that was accepted for later
    (durable=False) is reported by `sync()` at the latest. The repository commits a restore point
    by putting its chunks and indexes (durable=False), calling `sync()`, then putting the manifest
    (durable=True).

Listing
    `list(prefix)` yields an `ObjectInfo` for every object whose name starts with `prefix`, which
    is "" (everything) or ends with "/". The order is unspecified: callers sort. Objects put
    before the listing started and not deleted are listed; objects put or deleted meanwhile may or
    may not be. Temporary objects of writes in progress are never listed.

Times
    `ObjectInfo.mtime` is the time (seconds since the epoch) the object was last put or touched.
    `touch(name)` renews it to now (garbage collection keeps recently used chunks, see
    repo/gc.py) and answers whether the object exists. Backends whose touch cannot renew the time
    say so in `Capabilities.touch_renews_mtime`.

Rename
    `rename(name, new_name)` gives the object a new name and replaces `new_name` if it exists. It
    is one atomic step only where `Capabilities.atomic_rename` says so (S3 copies, then deletes:
    a crash in between leaves both names holding the same bytes).

Abandoned temporaries
    A backend that writes through temporary objects (the local directory does) lists them with
    `list_temporary()`, saying for each whether its writer is known to be gone; `delete` accepts
    those names. Garbage collection removes old ones; other backends yield nothing.

Creating
    `storage.open(location, create=True)` refuses a location that holds anything
    (`RepositoryExists`) and makes it exist. `prepare(prefixes)` then makes every prefix ready to
    take objects, durably, so that a later durable put never has to make a directory durable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from surepoint.errors import ObjectNotFound

__all__ = ["Backend", "Capabilities", "ObjectInfo", "ObjectNotFound", "TemporaryInfo"]


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float


@dataclass(frozen=True)
class TemporaryInfo:
    """A leftover of a write: `writer_gone` is True when the backend knows its writer no longer runs."""

    name: str
    size: int
    mtime: float
    writer_gone: bool


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise beyond the common contract; the repository adapts to it."""

    atomic_rename: bool = True
    """`rename` is one atomic step (otherwise copy then delete)."""

    touch_renews_mtime: bool = True
    """`touch` renews the mtime that `list` and `stat` report (garbage collection relies on it)."""

    object_lock: bool = False
    """Objects can be made immutable for a retention period (S3 Object Lock)."""

    append_only: bool = False
    """The backend refuses to delete or replace objects (a server in append-only mode)."""


class Backend(ABC):
    """Named objects in a flat namespace; see the module docstring for the rules."""

    location: str
    """Where the objects live, as the user would write it (a path, s3://bucket/prefix...)."""

    capabilities: Capabilities = Capabilities()

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The whole object; ObjectNotFound if there is none."""

    @abstractmethod
    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        """Store `data` under `name` atomically (replacing an existing object); durable now or at `sync()`."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; ObjectNotFound if there is none."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with `prefix` ("" or ending in "/"), in no particular order."""

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Size and mtime of the object; ObjectNotFound if there is none."""

    @abstractmethod
    def touch(self, name: str) -> bool:
        """Renew the object's mtime to now (garbage collection keeps it); False if it does not exist."""

    @abstractmethod
    def rename(self, name: str, new_name: str) -> None:
        """Move an object to a new name, replacing what is there; ObjectNotFound if `name` does not exist."""

    @abstractmethod
    def sync(self) -> None:
        """Make every object put so far durable; raise the first failure of a deferred write."""

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    def prepare(self, prefixes: Iterable[str]) -> None:
        """Make each prefix ready to take objects, durably (a new repository calls this once)."""
        return None  # object stores have no directories

    def list_temporary(self) -> Iterator[TemporaryInfo]:
        """Leftovers of interrupted writes, which `delete` accepts; none for backends without temporaries."""
        return iter(())

    def close(self) -> None:
        """Finish deferred work and release connections; the backend is not used afterwards."""
        return None

    def after_fork(self) -> None:
        """Called in a child process right after `os.fork()` (the mount server): open connections of
        its own. A child must never share a socket, pipe or worker thread with its parent; local
        files need nothing."""
        return None
