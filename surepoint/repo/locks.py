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
from surepoint.text import printable

LOCK_PREFIX = "locks/"
REFRESH_SECONDS = 300
STALE_SECONDS = 1800  # a lock of another host not refreshed for this long is abandoned

# Readers: jobs that read restore points and name them in their lock (`points`). A reader and
# forget cannot both miss each other (each writes its lock, then looks): a reader that sees a live
# forget waits for it to end; a forget that sees a reader keeps the points it names. gc removes
# only what no restore point refers to, so the points a reader holds keep every chunk they need.
READER_KINDS = ("restore", "mount", "instant", "lab", "copy", "verify")
CONFLICTS: dict[str, set[str]] = {
    "backup": {"exclusive"},
    **{kind: {"forget", "exclusive"} for kind in READER_KINDS},
    "forget": {"forget", "exclusive"},  # readers: not a conflict, their points are kept (held_points)
    "gc": {"gc", "exclusive"},
    "exclusive": {"backup", "verify", "forget", "gc", "exclusive", *READER_KINDS},
}
READ_ONLY_KINDS = set(READER_KINDS)  # jobs that only read the repository
MAX_LOCK_POINTS = 100_000


@dataclass
class LockRecord:
    id: str
    kind: str
    host: str
    pid: int
    created: float
    refreshed: float
    points: list[str] | None = None  # readers: the restore points they read
    purpose: str | None = None  # readers: what for ("mount at /mnt/x"), for the messages that name them

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        what = f" ({printable(self.purpose)})" if self.purpose else ""
        return f"{self.kind}{what} by pid {self.pid} on {self.host} since {when}"

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}).encode()


def is_stale(lock: LockRecord, now: float | None = None) -> bool:
    if lock.host == socket.gethostname():
        return not process_alive(lock.pid)
    return (now or time.time()) - lock.refreshed > STALE_SECONDS


LOCK_FIELDS = {"id": str, "kind": str, "host": str, "pid": int, "created": (int, float), "refreshed": (int, float)}


OPTIONAL_LOCK_FIELDS = {"points": list, "purpose": str}


def parse_lock(data: bytes) -> LockRecord:
    """A lock record with every field checked (ValueError when one is wrong)."""
    raw = json.loads(data)
    if not isinstance(raw, dict) or not set(LOCK_FIELDS) <= set(raw) <= set(LOCK_FIELDS) | set(OPTIONAL_LOCK_FIELDS):
        raise ValueError("not a lock record")
    for key, types in (LOCK_FIELDS | OPTIONAL_LOCK_FIELDS).items():
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], types)):
            raise ValueError(f"lock record: {key} has the wrong type")
    if raw["kind"] not in CONFLICTS or not 0 < raw["pid"] < 1 << 32:
        raise ValueError("lock record: unknown kind or impossible pid")
    if not all(0 <= raw[k] < 1e11 for k in ("created", "refreshed")):
        raise ValueError("lock record: impossible time")
    points = raw.get("points", [])
    if len(points) > MAX_LOCK_POINTS or not all(isinstance(p, str) and 0 < len(p) <= 64 for p in points):
        raise ValueError("lock record: bad restore point list")
    if len(raw.get("purpose", "")) > 4096:
        raise ValueError("lock record: purpose too long")
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


class LockConflict(RepositoryLocked):
    """A conflicting lock is held; `other` is its record."""

    def __init__(self, other: LockRecord) -> None:
        super().__init__(f"repository is locked ({other.describe()})")
        self.other = other


def held_points(backend: Backend) -> dict[str, LockRecord]:
    """The restore points that live readers hold: point id -> the reader's lock (forget keeps them)."""
    held: dict[str, LockRecord] = {}
    for lock in read_locks(backend):
        if lock.kind in READER_KINDS and lock.points and not is_stale(lock):
            for point in lock.points:
                held.setdefault(point, lock)
    return held


@contextmanager
def repository_lock(
    backend: Backend, kind: str, *, points: list[str] | None = None, purpose: str | None = None
) -> Iterator[LockRecord]:
    """Hold a lock of `kind` for the duration of the block; fail at once if a conflicting one is held.

    Readers name the restore points they read in `points` (and what they are, in `purpose`)."""
    now = time.time()
    record = LockRecord(secrets.token_hex(8), kind, socket.gethostname(), os.getpid(), now, now, points, purpose)
    name = LOCK_PREFIX + record.id
    try:
        backend.put(name, record.to_json())
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
            raise LockConflict(other)
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
                backend.put(name, record.to_json())

    refresher = threading.Thread(target=refresh, name="lock-refresh", daemon=True)
    try:
        refresher.start()
        yield record
    finally:
        stop.set()
        with suppress(ObjectNotFound):
            backend.delete(name)


FORGET_WAIT_SECONDS = 60.0


@contextmanager
def reader_lock(
    backend: Backend,
    kind: str,
    points: list[str],
    purpose: str,
    *,
    wait: float = FORGET_WAIT_SECONDS,
    poll: float = 0.2,
) -> Iterator[LockRecord]:
    """A reader's lock naming `points`; a running forget is waited for (it is short), up to `wait` s.

    The caller checks, once this is held, that its points still exist: one forgotten before the
    lock was in place is gone for good (Repository.reading does both)."""
    assert kind in READER_KINDS
    deadline = time.monotonic() + wait
    with contextlib.ExitStack() as stack:
        while True:
            try:
                record = stack.enter_context(repository_lock(backend, kind, points=list(points), purpose=purpose))
            except LockConflict as exc:
                if exc.other.kind != "forget" or time.monotonic() >= deadline:
                    raise
                time.sleep(poll)
                continue
            break
        yield record
