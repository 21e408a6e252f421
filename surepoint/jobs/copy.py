"""Backup copy jobs: bring restore points the target repository lacks from a source repository.

Each restore point is copied like a backup writes one: chunks first, then its indexes, a sync,
and its manifest last, so a copy killed at any moment leaves no half restore point on the target;
the next run finds the chunks already sent (by their target id) and sends only the rest.

The two repositories may have different keys and ciphers. A chunk is read and checked with the
source's keys and stored sealed with the target's; its id on the target is the target's keyed
digest of the plaintext, so the target index names target ids. Reading a chunk only to learn its
target id is avoided where the answer is known: repositories that share the chunk-id key (or
both have none) use the same ids, and the indexes of a restore point copied earlier map source
ids to target ids position by position.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from surepoint.errors import DamagedData, InvalidArgument, SurepointError
from surepoint.events import Component, EventRecorder, EventStore, Outcome, Phase
from surepoint.interrupt import at_stake, checkpoint
from surepoint.repo.chunks import ZERO_ID, chunk_object_name
from surepoint.repo.envelope import KIND_CHUNK
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.locks import repository_lock
from surepoint.repo.logstore import LogStore
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import MANIFEST_PREFIX, Repository, utc_now
from surepoint.storage.backend import ObjectNotFound

COPY_METADATA = "copied_from"  # manifest metadata on the target: {"repository": source id, "copied": time}

# The source is read under a reader lock naming the points being copied (repository.reading): a
# forget there keeps them, so gc there keeps their chunks; gc and backups on the source go on.
SOURCE_LOCK_KIND = "copy"
TARGET_LOCK_KIND = "backup"  # chunks a copy writes or reuses are protected from gc like a backup's


class CopyNotPossible(InvalidArgument):
    """The two repositories cannot hold the same restore points (different chunk sizes, same repository)."""


@dataclass
class CopyOptions:
    names: Sequence[str] = ()
    since: str | None = None  # ISO UTC: only restore points created at or after this time
    bandwidth: int | None = None  # bytes per second written to the target
    workers: int | None = None  # chunks copied at once; default 4, or the backends' concurrency hint if higher


@dataclass
class PointCopy:
    id: str
    name: str
    created: str
    consistency: str
    chunks: int = 0  # distinct non-zero chunks of the point
    sent_chunks: int = 0  # written to the target
    sent_bytes: int = 0  # as stored on the target
    present_chunks: int = 0  # already on the target (from earlier copies, backups or an interrupted run)
    read_chunks: int = 0  # read from the source
    seconds: float = 0.0


@dataclass
class Skipped:
    id: str
    name: str
    reason: str


@dataclass
class CopyResult:
    source: str
    target: str
    copied: list[PointCopy] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_present: int = 0
    logs: list[str] = field(default_factory=list)  # shipped transaction-log files copied ("name/writer/file")
    log_bytes: int = 0

    @property
    def sent_bytes(self) -> int:
        return sum(p.sent_bytes for p in self.copied)

    @property
    def sent_chunks(self) -> int:
        return sum(p.sent_chunks for p in self.copied)


def copied_from(point: RestorePoint) -> str | None:
    """The id of the repository a restore point was copied from, if it is a copy."""
    record = point.metadata.get(COPY_METADATA)
    return record.get("repository") if isinstance(record, dict) else None


def plan_copy(
    source_points: Sequence[RestorePoint],
    target_points: Sequence[RestorePoint],
    source_id: str,
    *,
    names: Sequence[str] = (),
    since: str | None = None,
) -> tuple[list[RestorePoint], list[Skipped], int]:
    """What to copy, oldest first: (to copy, skipped with a reason, count already on the target).

    A point the target has (same id) is not copied again. Nor is one older than the newest copy
    of its name on the target: the target's own retention forgot it, and a copy job must not
    bring it back at every run.
    """
    on_target = {p.id for p in target_points}
    newest_copy: dict[str, str] = {}
    for p in target_points:
        if copied_from(p) == source_id and p.created > newest_copy.get(p.name, ""):
            newest_copy[p.name] = p.created
    wanted, skipped, present = [], [], 0
    for p in sorted(source_points, key=lambda p: (p.created, p.id)):
        if names and p.name not in names:
            continue
        if since and p.created < since:
            continue
        if p.id in on_target:
            present += 1
        elif p.created < newest_copy.get(p.name, ""):
            skipped.append(Skipped(p.id, p.name, "older than the newest copy of its name on the target"))
        else:
            wanted.append(p)
    return wanted, skipped, present


class Throttle:
    """A token bucket shared by the copying threads: at most `rate` bytes per second on average."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)


class _Copier:
    """Moves chunks from one repository to the other; remembers source id -> target id."""

    def __init__(self, source: Repository, target: Repository, options: CopyOptions) -> None:
        self.source = source
        self.target = target
        self.throttle = Throttle(options.bandwidth)
        src_key = source.keys.chunk_id if source.keys else None
        dst_key = target.keys.chunk_id if target.keys else None
        self.same_ids = src_key == dst_key
        # Same ids and the same envelope keys: the stored object can be sent as it is, after checking it.
        self.same_objects = self.same_ids and (
            (source.keys is None and target.keys is None)
            or (source.keys is not None and target.keys is not None and source.keys == target.keys)
        )
        self.id_map: dict[bytes, bytes] = {}  # source id -> target id, known without reading
        self.done: dict[bytes, bytes] = {}  # chunks this run has already made sure of on the target
        self._lock = threading.Lock()
        self._sent = 0
        self._fault_after = _fault_count()

    def learn(self, source_index: FixedIndex, target_index: FixedIndex) -> None:
        if len(source_index.ids) != len(target_index.ids):
            return
        for s, t in zip(source_index.ids, target_index.ids, strict=True):
            if s != ZERO_ID and t != ZERO_ID:
                self.id_map.setdefault(s, t)

    def copy_chunk(self, source_id: bytes, stats: PointCopy) -> bytes:
        """Make sure the target holds this chunk; return its target id."""
        with self._lock:
            known = self.done.get(source_id)
        if known is not None:
            return known
        target_id = self.id_map.get(source_id) or (source_id if self.same_ids else None)
        if target_id is not None and self.target.chunks.claim_existing(target_id):
            with self._lock:
                stats.present_chunks += 1
                self.done[source_id] = target_id
            return target_id
        name = chunk_object_name(source_id)
        try:
            blob = self.source.backend.get(name)
        except ObjectNotFound:
            raise DamagedData(f"chunk {source_id.hex()[:16]} is missing from the source repository") from None
        data = self.source.envelope.open(KIND_CHUNK, source_id.hex(), blob)
        if self.source.chunks.chunk_id(data) != source_id:
            raise DamagedData(f"chunk {source_id.hex()[:16]} is damaged (content does not match its id)")
        with self._lock:
            stats.read_chunks += 1
        target_id = source_id if self.same_ids else self.target.chunks.chunk_id(data)
        if self.target.chunks.claim_existing(target_id):
            with self._lock:
                stats.present_chunks += 1
        else:
            if self.same_objects:
                self.throttle.take(len(blob))
                self.target.backend.put(chunk_object_name(target_id), blob, durable=False)
                stored = len(blob)
            else:
                sealed = self.target.envelope.seal(KIND_CHUNK, target_id.hex(), data)
                self.throttle.take(len(sealed))
                self.target.backend.put(chunk_object_name(target_id), sealed, durable=False)
                stored = len(sealed)
            with self._lock:
                stats.sent_chunks += 1
                stats.sent_bytes += stored
                self._sent += 1
                sent = self._sent
            if self._fault_after is not None and sent >= self._fault_after:
                os.kill(os.getpid(), signal.SIGKILL)  # testing aid, see _fault_count
        with self._lock:
            self.done[source_id] = target_id
        return target_id


def _fault_count() -> int | None:
    """Testing aid: SUREPOINT_FAULT=copy-after-chunks:N kills the process after N chunks sent, as kill -9 would."""
    value = os.environ.get("SUREPOINT_FAULT", "")
    if value.startswith("copy-after-chunks:"):
        return int(value.split(":", 1)[1])
    return None


def _check_compatible(source: Repository, target: Repository) -> None:
    if source.id == target.id:
        raise CopyNotPossible(f"source and target are the same repository ({source.id})")
    if source.chunk_size != target.chunk_size:
        raise CopyNotPossible(
            f"the target repository's chunk size ({target.chunk_size} bytes) differs from the source's "
            f"({source.chunk_size} bytes): a copy needs the same chunk size on both sides"
        )


def _learn_from_earlier_copies(
    copier: _Copier,
    source_points: Sequence[RestorePoint],
    target_points: Sequence[RestorePoint],
    wanted: Sequence[RestorePoint],
    say: Callable[[str], None],
) -> None:
    """Seed the id map from the newest restore point of each name already copied to the target."""
    if copier.same_ids:
        return
    source, target = copier.source, copier.target
    source_by_id = {p.id: p for p in source_points}
    names = {p.name for p in wanted}
    latest: dict[str, RestorePoint] = {}
    for p in target_points:  # oldest first: the last one of a name wins
        if p.id in source_by_id and p.name in names:
            latest[p.name] = p
    for name, tp in latest.items():
        sp = source_by_id[tp.id]
        try:
            for disk in sp.disks:
                copier.learn(source.load_index(sp, disk.number), target.load_index(tp, disk.number))
        except (DamagedData, SurepointError) as exc:
            say(f"{name}: earlier copy {tp.id} not usable as a map ({exc}): its chunks are read again")


def _copy_point(copier: _Copier, point: RestorePoint, workers: int, progress) -> tuple[RestorePoint, PointCopy]:
    source, target = copier.source, copier.target
    stats = PointCopy(point.id, point.name, point.created, point.consistency)
    started = time.monotonic()
    indexes: dict[int, FixedIndex] = {}
    disks = []
    seen: set[bytes] = set()
    with ThreadPoolExecutor(workers) as pool:
        for disk in point.disks:
            if disk.chunk_size != target.chunk_size:
                raise CopyNotPossible(
                    f"restore point {point.id} disk {disk.number} has {disk.chunk_size}-byte chunks, "
                    f"the target repository {target.chunk_size}-byte ones"
                )
            source_index = source.load_index(point, disk.number)
            unique = [c for c in dict.fromkeys(source_index.ids) if c != ZERO_ID]
            seen.update(unique)

            def one(chunk_id: bytes, chunk_size: int = source_index.chunk_size) -> tuple[bytes, bytes]:
                target_id = copier.copy_chunk(chunk_id, stats)
                if progress:
                    progress(chunk_size)
                return chunk_id, target_id

            mapping = dict(pool.map(one, unique))
            if progress:  # zero and repeated chunks: done without work
                progress(max(0, disk.size - len(unique) * source_index.chunk_size))
            ids = [ZERO_ID if c == ZERO_ID else mapping[c] for c in source_index.ids]
            target_index = FixedIndex(source_index.disk_size, source_index.chunk_size, ids)
            copier.learn(source_index, target_index)
            indexes[disk.number] = target_index
            disks.append(replace(disk, index=target.index_name(point.id, disk.number)))
    stats.chunks = len(seen)
    metadata = dict(point.metadata)
    metadata[COPY_METADATA] = {"repository": source.id, "copied": utc_now()}
    copy = replace(point, disks=disks, metadata=metadata)
    target.commit(copy, indexes)
    stats.seconds = round(time.monotonic() - started, 3)
    return copy, stats


def copy_restore_points(
    source: Repository,
    target: Repository,
    events: EventStore | None,
    options: CopyOptions,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> CopyResult:
    """Copy the restore points the target lacks; record events on both sides, each under its own id."""
    say = log or (lambda _m: None)
    _check_compatible(source, target)
    result = CopyResult(source.id, target.id)
    with repository_lock(target.backend, TARGET_LOCK_KIND):
        source_points, target_points = source.list_restore_points(), target.list_restore_points()
        wanted, skipped, present = plan_copy(
            source_points, target_points, source.id, names=options.names, since=options.since
        )
        result.skipped, result.already_present = skipped, present
        # A reader lock on the points to copy: forget on the source keeps them (and so gc keeps
        # their chunks) until the copy ends; one forgotten before the lock was in place is skipped.
        reading = source.reading(wanted, "copy", f"copy to {target.backend.location}", require_all=False)
        planned = len(wanted)

        def state() -> str:
            return (
                f"{len(result.copied)} of {planned} restore point(s) copied to {target.backend.location}; no partial "
                "restore point is left there, and the chunks already sent are not sent again by the next copy"
            )

        def record(message: str) -> None:
            EventRecorder(events, target.id).record(Component.COPY, Phase.FINISH, Outcome.FAILED, message)

        with at_stake(state, record), reading as gone:
            wanted = [p for p in wanted if p.id not in gone]
            for point in (p for p in source_points if p.id in gone):
                result.skipped.append(Skipped(point.id, point.name, "forgotten on the source before the copy"))
            if on_plan:
                on_plan(sum(p.size for p in wanted))
            copier = _Copier(source, target, options)
            workers = options.workers or max(
                4, getattr(source.backend, "concurrency", 0), getattr(target.backend, "concurrency", 0)
            )
            _learn_from_earlier_copies(copier, source_points, target_points, wanted, say)
            for point in wanted:
                on_target = EventRecorder(events, target.id, restore_point=point.id, source=point.name)
                on_source = EventRecorder(events, source.id, restore_point=point.id, source=point.name)
                on_target.record(Component.COPY, Phase.START, Outcome.OK, f"copy from repository {source.id}")
                try:
                    _copy, stats = _copy_point(copier, point, workers, progress)
                except DamagedData as exc:
                    if not source.backend.exists(MANIFEST_PREFIX + point.id):
                        result.skipped.append(Skipped(point.id, point.name, "forgotten on the source during the copy"))
                        on_target.record(Component.COPY, Phase.FINISH, Outcome.SKIPPED, "forgotten on the source")
                        continue
                    on_target.record(Component.COPY, Phase.FINISH, Outcome.FAILED, f"from {source.id}: {exc}")
                    raise
                except SurepointError as exc:
                    on_target.record(Component.COPY, Phase.FINISH, Outcome.FAILED, f"from {source.id}: {exc}")
                    raise
                result.copied.append(stats)
                message = (
                    f"copied from repository {source.id}: {stats.sent_chunks} chunks sent "
                    f"({stats.sent_bytes} bytes), {stats.present_chunks} already there"
                )
                on_target.record(Component.COPY, Phase.COMMIT, Outcome.OK, message)
                on_source.record(Component.COPY, Phase.SEND, Outcome.OK, f"copied to repository {target.id}")
                say(f"{point.id} {point.name}: {stats.sent_chunks} chunks sent, {stats.present_chunks} already there")
                checkpoint("copy-point")
            names = set(options.names) or {p.name for p in source_points}
            _copy_logs(copier, names, result, say)
            if result.logs:
                EventRecorder(events, target.id).record(
                    Component.COPY, Phase.COMMIT, Outcome.OK, f"{len(result.logs)} shipped log files from {source.id}"
                )
    return result


def _copy_logs(copier: _Copier, names: set[str], result: CopyResult, say: Callable[[str], None]) -> None:
    """Bring the shipped transaction logs the target's restore points can replay and it lacks.

    A log file is copied for a name that has restore points on the target, when it covers time
    after the oldest of them (older logs could not be replayed onto any of them, and the target's
    own retention may have forgotten them).
    """
    source, target = copier.source, copier.target
    oldest: dict[str, str] = {}
    for p in target.list_restore_points():
        if p.name in names and (p.name not in oldest or p.created < oldest[p.name]):
            oldest[p.name] = p.created
    source_logs, target_logs = LogStore(source), LogStore(target)
    for record in sorted(source_logs.all_records(), key=lambda r: (r.name, r.writer, r.file)):
        since = oldest.get(record.name)
        if since is None or record.covers_until < since or target_logs.has(record.name, record.writer, record.file):
            continue
        data = source_logs.read(record)  # checked chunk by chunk with the source's keys
        copier.throttle.take(len(data))
        target_logs.put(record.name, record.writer, record.file, data, record.covers_until)
        result.logs.append(f"{record.name}/{record.writer}/{record.file}")
        result.log_bytes += len(data)
    if result.logs:
        say(f"{len(result.logs)} shipped log files copied")
