"""In-memory backend: the whole contract in a dict, for fast tests of the repository and its jobs.

`crash()` forgets every object put with durable=False since the last `sync()` (and restores what
those puts replaced), which is what a power loss may do to a real backend: tests use it to check
the order of a commit. The clock is injectable so garbage-collection tests need not sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound

_ABSENT = object()


class MemoryBackend(Backend):
    capabilities = Capabilities(atomic_rename=True, touch_renews_mtime=True)

    def __init__(self, location: str = "memory://test", *, clock: Callable[[], float] = time.time) -> None:
        self.location = location
        self.clock = clock
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._unsynced: dict[str, object] = {}  # name -> what a crash brings back (or _ABSENT)
        self._lock = threading.Lock()

    @staticmethod
    def _check(name: str) -> None:
        if not name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"bad object name {name!r}")

    def get(self, name: str) -> bytes:
        self._check(name)
        with self._lock:
            try:
                return self._objects[name][0]
            except KeyError:
                raise ObjectNotFound(name) from None

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        self._check(name)
        with self._lock:
            if not durable and name not in self._unsynced:
                self._unsynced[name] = self._objects.get(name, _ABSENT)
            if durable:
                self._unsynced.pop(name, None)
            self._objects[name] = (bytes(data), self.clock())

    def delete(self, name: str) -> None:
        self._check(name)
        with self._lock:
            if self._objects.pop(name, None) is None:
                raise ObjectNotFound(name)
            self._unsynced.pop(name, None)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            found = [ObjectInfo(n, len(d), t) for n, (d, t) in self._objects.items() if n.startswith(prefix)]
        yield from found

    def stat(self, name: str) -> ObjectInfo:
        self._check(name)
        with self._lock:
            try:
                data, mtime = self._objects[name]
            except KeyError:
                raise ObjectNotFound(name) from None
        return ObjectInfo(name, len(data), mtime)

    def touch(self, name: str) -> bool:
        self._check(name)
        with self._lock:
            if name not in self._objects:
                return False
            self._objects[name] = (self._objects[name][0], self.clock())
            return True

    def rename(self, name: str, new_name: str) -> None:
        self._check(name)
        self._check(new_name)
        with self._lock:
            try:
                entry = self._objects.pop(name)
            except KeyError:
                raise ObjectNotFound(name) from None
            self._objects[new_name] = entry
            self._unsynced.pop(name, None)

    def sync(self) -> None:
        with self._lock:
            self._unsynced.clear()

    # for tests ---------------------------------------------------------------------------------

    def crash(self) -> None:
        """Lose what a power loss may lose: every put with durable=False since the last sync."""
        with self._lock:
            for name, before in self._unsynced.items():
                if before is _ABSENT:
                    self._objects.pop(name, None)
                else:
                    self._objects[name] = before  # type: ignore[assignment]
            self._unsynced.clear()

    def set_mtime(self, name: str, mtime: float) -> None:
        """Age an object (what an old backup would have left) without waiting."""
        with self._lock:
            self._objects[name] = (self._objects[name][0], mtime)
