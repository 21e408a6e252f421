"""Garbage collection: delete chunks and indexes no restore point refers to, safely beside running backups.

Safety rule (docs/repository-format.md, "Garbage collection"): a backup touches (updates the
mtime of) every stored chunk it reuses and writes every other chunk new, all after it took its
backup lock. GC computes `cutoff = min(gc start, oldest live backup lock) - MARGIN` and only
removes unreferenced objects older than the cutoff. The last race, a backup touching a chunk
between GC's listing and its delete, is closed by moving a chunk to trash/ first and looking at
its mtime again: a chunk touched meanwhile goes back.

Where rename is not atomic (S3: copy, then delete) a backup may touch a chunk between gc's look
at its mtime and the delete of the original. There gc only parks the chunk in trash/ (where
reading still finds it) and deletes it in a later run, once every backup that was running when
it was parked has finished: by then a point that reused it is listed and the chunk goes back.
Objects under retention (S3 Object Lock) are never touched: gc counts them and says until when.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from surepoint.errors import (
    DamagedData,
    ObjectLocked,
    RestorePointForgotten,
    StorageError,
    UnreadableRestorePoints,
)
from surepoint.interrupt import checkpoint
from surepoint.repo import logstore
from surepoint.repo.ahead import Ahead
from surepoint.repo.backup import default_workers
from surepoint.repo.chunks import CHUNK_PREFIX, ZERO_ID, chunk_id_from_name, chunk_object_name
from surepoint.repo.locks import is_stale, read_locks, remove_stale_locks, repository_lock
from surepoint.repo.repair import QUARANTINE_PREFIX
from surepoint.repo.repository import INDEX_PREFIX, TRASH_PREFIX, Repository
from surepoint.storage.backend import Backend, ObjectInfo, ObjectNotFound

MARGIN_SECONDS = 300
# File systems stamp mtimes from the kernel's coarse clock, which lags time.time() (a lock's
# `created`) by up to a scheduler tick: a chunk written just after its backup took the lock can look
# older than the lock. A tenth of a second covers any tick length.
CLOCK_SLACK_SECONDS = 0.1
TEMPORARY_MIN_AGE = 3600


@dataclass
class GcResult:
    referenced_chunks: int = 0
    removed_chunks: int = 0
    removed_bytes: int = 0
    kept_recent_chunks: int = 0
    removed_indexes: int = 0
    removed_temporary: int = 0
    restored_from_trash: int = 0
    trashed_chunks: int = 0  # parked in trash/, deleted by a later run (no atomic rename)
    trashed_bytes: int = 0
    locked_objects: int = 0  # under retention: deleted by a gc after `locked_until`
    locked_until: float | None = None
    dry_run: bool = False
    unreadable_points: list[str] = field(default_factory=list)


def collect_garbage(
    repository: Repository,
    *,
    dry_run: bool = False,
    margin: float = MARGIN_SECONDS,
    log: Callable[[str], None] | None = None,
    result: GcResult | None = None,
) -> GcResult:
    """Remove what no restore point refers to; `result` (if given) is filled in as the work goes."""
    say = log or (lambda _m: None)
    backend = repository.backend
    result = result if result is not None else GcResult(dry_run=dry_run)
    result.dry_run = dry_run
    if backend.capabilities.append_only and not dry_run:
        raise StorageError(f"{backend.location} is append-only: garbage collection runs on the server that holds it")
    with repository_lock(backend, "gc"):
        remove_stale_locks(backend)
        started = time.time()
        backups = [lk for lk in read_locks(backend) if lk.kind == "backup" and not is_stale(lk)]
        cutoff = min([started] + [lk.created - CLOCK_SLACK_SECONDS for lk in backups]) - margin
        if backups:
            say(f"{len(backups)} backup(s) running: keeping everything written since they started")

        referenced: set[bytes] = set()
        live_indexes: set[str] = set()
        points = repository.list_restore_points()
        for point in points:
            for disk in point.disks:
                live_indexes.add(disk.index)
                try:
                    referenced.update(repository.load_index(point, disk.number).ids)
                except RestorePointForgotten:
                    continue  # forgotten since the listing (never one a reader holds): nothing to keep
                except DamagedData:
                    # Without its index we cannot know what the point needs; refuse to delete anything.
                    result.unreadable_points.append(point.id)
        if result.unreadable_points:
            raise UnreadableRestorePoints(
                "garbage collection stopped, nothing was deleted: the indexes of restore points "
                + ", ".join(sorted(set(result.unreadable_points)))
                + " are unreadable"
            )
        if repository.damaged_manifests:
            raise UnreadableRestorePoints(
                "garbage collection stopped, nothing was deleted: unreadable manifests "
                + ", ".join(repository.damaged_manifests)
            )
        referenced.update(logstore.referenced_chunks(repository))  # shipped transaction logs (repo/logstore.py)
        referenced.discard(ZERO_ID)
        result.referenced_chunks = len(referenced)

        atomic_rename = backend.capabilities.atomic_rename
        locked_until = getattr(backend, "locked_until", None) if backend.capabilities.object_lock else None

        def locked(name: str) -> bool:
            until = locked_until(name) if locked_until else None
            if until:
                result.locked_objects += 1
                result.locked_until = max(result.locked_until or 0.0, until)
            return bool(until)

        for info in list(backend.list(TRASH_PREFIX)):
            chunk_id = chunk_id_from_name(info.name)
            if chunk_id in referenced and not dry_run:
                _rename_back(backend, info.name, chunk_object_name(chunk_id))
                result.restored_from_trash += 1
            elif not dry_run and (atomic_rename or info.mtime < cutoff):
                # Without atomic rename: parked before every running backup began, so none reuses it.
                _delete_quietly(backend, info.name)
                if not atomic_rename:
                    result.removed_chunks += 1
                    result.removed_bytes += info.size

        def remove(info: ObjectInfo) -> tuple[str, float | None]:
            """Remove one unreferenced chunk: what happened to it, and the retention date if locked."""
            trash = TRASH_PREFIX + chunk_id_from_name(info.name).hex()
            if not atomic_rename:
                try:
                    if backend.stat(info.name).mtime >= cutoff:  # claimed since the listing
                        return "kept", None
                    backend.rename(info.name, trash)
                except ObjectNotFound:
                    return "gone", None
                except ObjectLocked as exc:  # a backup extended its retention since we looked
                    return "locked", exc.until
                return "trashed", None
            try:
                backend.rename(info.name, trash)
            except ObjectNotFound:
                return "gone", None
            moved = backend.stat(trash)
            if moved.mtime >= cutoff:  # a backup claimed it between our listing and the move
                _rename_back(backend, trash, info.name)
                return "kept", None
            _delete_quietly(backend, trash)
            return "removed", None

        def doomed():
            for info in backend.list(CHUNK_PREFIX):
                chunk_id = chunk_id_from_name(info.name)
                if chunk_id is None or chunk_id in referenced:
                    continue
                if info.mtime >= cutoff:
                    result.kept_recent_chunks += 1
                    continue
                if locked(info.name):
                    continue
                if dry_run:
                    result.removed_chunks += 1
                    result.removed_bytes += info.size
                    continue
                yield info

        def tally(info: ObjectInfo, outcome: str, until: float | None) -> None:
            if outcome == "kept":
                result.kept_recent_chunks += 1
            elif outcome == "locked":
                result.locked_objects += 1
                result.locked_until = max(result.locked_until or 0.0, until or 0.0)
            elif outcome == "trashed":
                result.trashed_chunks += 1
                result.trashed_bytes += info.size
            elif outcome == "removed":
                result.removed_chunks += 1
                result.removed_bytes += info.size

        # Chunks are removed by several threads (each removal is a rename, a look and a delete: on
        # object storage, three round trips), a bounded window of them in flight.
        workers = default_workers(backend)
        with ThreadPoolExecutor(workers) as pool:
            removals = Ahead(pool, remove, doomed(), 2 * workers)
            try:
                for info, (outcome, until) in removals:
                    tally(info, outcome, until)
                    checkpoint("gc-chunk")
            finally:
                # interrupted: what has not begun is dropped; what was under way ends and is counted,
                # so the report says exactly how many chunks went
                for info, future in removals.abandon():
                    with contextlib.suppress(Exception):
                        tally(info, *future.result())

        for info in list(backend.list(QUARANTINE_PREFIX)):  # damaged copies set aside by verify --repair
            chunk_id = chunk_id_from_name(info.name)
            if chunk_id not in referenced and info.mtime < cutoff and not locked(info.name):
                result.removed_chunks += 1
                result.removed_bytes += info.size
                if not dry_run:
                    _delete_quietly(backend, info.name)

        for info in backend.list(INDEX_PREFIX):
            if info.name not in live_indexes and info.mtime < cutoff and not locked(info.name):
                result.removed_indexes += 1
                if not dry_run:
                    _delete_quietly(backend, info.name)

        # A temporary object is live for the seconds its write takes; an hour old means its writer died.
        temporary_cutoff = min(cutoff, started - TEMPORARY_MIN_AGE)
        for temporary in list(backend.list_temporary()):
            if temporary.mtime < temporary_cutoff or (temporary.writer_gone and temporary.mtime < cutoff):
                result.removed_temporary += 1
                if not dry_run:
                    _delete_quietly(backend, temporary.name)
        if not dry_run:
            backend.sync()
    return result


def _rename_back(backend: Backend, trash_name: str, name: str) -> None:
    if backend.exists(name):  # a backup wrote it again meanwhile: same content, drop the trash copy
        _delete_quietly(backend, trash_name)
    else:
        backend.rename(trash_name, name)


def _delete_quietly(backend: Backend, name: str) -> None:
    with contextlib.suppress(ObjectNotFound):
        backend.delete(name)
