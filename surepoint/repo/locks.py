"""Repository locks: small objects under locks/ naming who works on the repository and since when.

Backups of any number of sources may run at once (chunks are content-addressed and written
atomically); what must not overlap is declared per lock kind in CONFLICTS. Garbage collection also
reads the backup locks to learn the start of the oldest running backup (see gc.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

from surepoint.errors import RepositoryLocked, SurepointError
from surepoint.processes import process_alive
from surepoint.storage.backend import Backend, ObjectNotFound

LOCK_PREFIX = "locks/"
REFRESH_SECONDS = 300
STALE_SECONDS = 1800  # a lock of another host not refreshed for this long is abandoned

CONFLICTS: dict[str, set[str]] = {
    "backup": {"exclusive"},
    # A reader (restore) and forget exclude each other (both ways, so that of two starting at
    # once one always sees the other): a point being read is never forgotten, hence never
    # collected, under the reader's feet. gc alone removes only what no point refers to.
    "restore": {"forget", "exclusive"},
    "verify": {"exclusive"},
    "forget": {"forget", "restore", "exclusive"},
    "gc": {"gc", "exclusive"},
    "exclusive": {"backup", "restore", "verify", "forget", "gc", "exclusive"},
}
READ_ONLY_KINDS = {"restore", "verify"}  # jobs that only read the repository


@dataclass
class LockRecord:
    id: str
    kind: str
    host: str
    pid: int
    created: float
    refreshed: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        return f"{self.kind} by pid {self.pid} on {self.host} since {when}"


def is_stale(lock: LockRecord, now: float | None = None) -> bool:
    if lock.host == socket.gethostname():
        return not process_alive(lock.pid)
    return (now or time.time()) - lock.refreshed > STALE_SECONDS


LOCK_FIELDS = {"id": str, "kind": str, "host": str, "pid": int, "created": (int, float), "refreshed": (int, float)}


def parse_lock(data: bytes) -> LockRecord:
    """A lock record with every field checked (ValueError when one is wrong)."""
    raw = json.loads(data)
    if not isinstance(raw, dict) or set(raw) != set(LOCK_FIELDS):
        raise ValueError("not a lock record")
    for key, types in LOCK_FIELDS.items():
        if isinstance(raw[key], bool) or not isinstance(raw[key], types):
            raise ValueError(f"lock record: {key} has the wrong type")
    if raw["kind"] not in CONFLICTS or not 0 < raw["pid"] < 1 << 32:
        raise ValueError("lock record: unknown kind or impossible pid")
    if not all(0 <= raw[k] < 1e11 for k in ("created", "refreshed")):
        raise ValueError("lock record: impossible time")
    return LockRecord(**raw)


def read_locks(backend: Backend) -> list[LockRecord]:
    """The readable locks; a damaged lock record is no lock (it is stale garbage, never a traceback)."""
    locks = []
    for info in backend.list(LOCK_PREFIX):
        try:
            locks.append(parse_lock(backend.get(info.name)))
        except (ObjectNotFound, ValueError, TypeError):
            continue
    return locks


def remove_stale_locks(backend: Backend) -> list[LockRecord]:
    removed = []
    for lock in read_locks(backend):
        if is_stale(lock):
            try:
                backend.delete(LOCK_PREFIX + lock.id)
                removed.append(lock)
            except ObjectNotFound:
                pass
    return removed


@contextmanager
def repository_lock(backend: Backend, kind: str) -> Iterator[LockRecord]:
    """Hold a lock of `kind` for the duration of the block; fail at once if a conflicting one is held."""
    now = time.time()
    record = LockRecord(secrets.token_hex(8), kind, socket.gethostname(), os.getpid(), now, now)
    name = LOCK_PREFIX + record.id
    try:
        backend.put(name, json.dumps(asdict(record)).encode())
        held = True
    except SurepointError:
        # A full or read-only repository can still be read: a reading job checks for conflicts
        # and runs without a lock object of its own.
        if kind not in READ_ONLY_KINDS:
            raise
        held = False
    except BaseException:  # interrupted while writing it: it may be in place already
        with suppress(Exception):
            backend.delete(name)
        raise
    # Write first, then look: of two processes racing, at least one sees the other and backs off.
    try:
        for other in read_locks(backend):
            if other.id == record.id or other.kind not in CONFLICTS[kind] or is_stale(other):
                continue
            raise RepositoryLocked(f"repository is locked ({other.describe()})")
    except BaseException:  # a conflict, or an interruption right after the lock was written
        if held:
            with suppress(Exception):
                backend.delete(name)
        raise
    if not held:
        yield record
        return
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(REFRESH_SECONDS):
            record.refreshed = time.time()
            with contextlib.suppress(Exception):  # a failed refresh must not kill the job
                backend.put(name, json.dumps(asdict(record)).encode())

    refresher = threading.Thread(target=refresh, name="lock-refresh", daemon=True)
    try:
        refresher.start()
        yield record
    finally:
        stop.set()
        with suppress(ObjectNotFound):
            backend.delete(name)
