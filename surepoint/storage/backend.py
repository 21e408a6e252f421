"""The storage-backend interface every repository backend implements (local directory, S3, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from surepoint.errors import ObjectNotFound

__all__ = ["Backend", "ObjectInfo", "ObjectNotFound"]


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float


class Backend(Protocol):
    """Named, immutable-once-written objects. Names are '/'-separated relative paths.

    `put` is atomic: a reader sees the whole object or none of it. Objects written with
    durable=False become durable at the next `sync()`; `sync()` returning means every object put
    before it survives a crash or power loss.
    """

    location: str

    def get(self, name: str) -> bytes: ...

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def stat(self, name: str) -> ObjectInfo: ...

    def touch(self, name: str) -> bool:
        """Mark an object as recently used (garbage collection keeps it); False if it does not exist."""
        ...

    def rename(self, name: str, new_name: str) -> None: ...

    def sync(self) -> None: ...
