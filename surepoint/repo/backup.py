"""The backup engine: turn disk sources into chunks and fixed indexes, then commit a restore point.

The calling thread reads the source in order (one sequential stream, friendly to disks and NBD
servers); a pool of workers hashes, compresses, encrypts and stores chunks in parallel.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from surepoint.interrupt import checkpoint, stop_point
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.extents import chunks_touched
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.locks import repository_lock
from surepoint.repo.manifest import CONSISTENCY_LEVELS, DiskRecord, RestorePoint
from surepoint.repo.repository import Repository, utc_now
from surepoint.repo.source import DiskSource

ProgressCallback = Callable[[int], None]

# Storing a chunk waits on fsync or the network far longer than it computes: several stores per
# core keep the disk busy while hashing, compression and encryption (which release the GIL) run.
# (A local backup of a 512 MiB image on 2 busy cores: 2 threads 3.45 s, 8 threads 2.15 s.)
THREADS_PER_CPU = 4
MAX_IN_FLIGHT_BYTES = 256 << 20  # chunks read but not yet stored, whatever the chunk size
# A chunk is compressed only when a sample of it compresses: ciphertext, media and archives are
# stored as they are, without spending a full zstd pass to find out.
SAMPLE_PIECES = 4
SAMPLE_PIECE = 16 << 10
INCOMPRESSIBLE = 0.97


def default_workers(backend: object) -> int:
    """Threads for a backup or restore; a remote backend says how many requests in flight pay off."""
    return max(4, THREADS_PER_CPU * (os.cpu_count() or 2), getattr(backend, "concurrency", 0))


def in_flight_limit(workers: int, chunk_size: int) -> int:
    return max(2, min(2 * workers, MAX_IN_FLIGHT_BYTES // chunk_size))


@dataclass
class BackupRequest:
    """What to back up and how to label it."""

    name: str
    sources: Sequence[DiskSource]
    source_info: dict = field(default_factory=dict)
    consistency: str = "crash"
    metadata: dict = field(default_factory=dict)
    disk_metadata: dict[int, dict] = field(default_factory=dict)
    base: RestorePoint | None = None  # previous restore point of the same source, for reuse
    use_base: bool = True
    restore_point_id: str | None = None  # chosen by the caller so job events can name it early


@dataclass
class _DiskStats:
    read_bytes: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    stored_bytes: int = 0
    reused_chunks: int = 0
    zero_chunks: int = 0
    new_zero_bytes: int = 0  # all-zero 4 KiB blocks inside new chunks (free space, holes): not data


ZERO_BLOCK = bytes(4096)


def zero_block_bytes(data: bytes) -> int:
    """Bytes of `data` in aligned 4 KiB blocks that are all zeros (a first and last byte test skips most)."""
    n = 0
    size = len(ZERO_BLOCK)
    for i in range(0, len(data) - size + 1, size):
        if data[i] == 0 and data[i + size - 1] == 0 and data[i : i + size] == ZERO_BLOCK:
            n += size
    return n


class _ChunkWriter:
    """Hashes and stores chunks; shared by the workers, remembers what this backup already wrote."""

    def __init__(self, repository: Repository) -> None:
        self.chunks = repository.chunks
        self._written: set[bytes] = set()
        self._lock = threading.Lock()
        self._zero = bytes(repository.chunk_size)
        self._probe = threading.local()

    def worth_compressing(self, data: bytes) -> bool:
        """Whether a sample spread over the chunk shrinks under fast zstd."""
        if len(data) <= SAMPLE_PIECES * SAMPLE_PIECE:
            return True
        step = len(data) // SAMPLE_PIECES
        sample = b"".join(data[i * step : i * step + SAMPLE_PIECE] for i in range(SAMPLE_PIECES))
        compressor = getattr(self._probe, "compressor", None)
        if compressor is None:
            compressor = self._probe.compressor = zstandard.ZstdCompressor(level=1)
        return len(compressor.compress(sample)) < INCOMPRESSIBLE * len(sample)

    def process(self, data: bytes, stats: _DiskStats) -> bytes:
        if data == self._zero[: len(data)]:
            with self._lock:
                stats.zero_chunks += 1
            return ZERO_ID
        chunk_id = self.chunks.chunk_id(data)
        with self._lock:
            fresh = chunk_id not in self._written
            self._written.add(chunk_id)
        # claim_existing touches the stored chunk, which tells a concurrent gc that it is in use.
        if not fresh or self.chunks.claim_existing(chunk_id):
            with self._lock:
                stats.reused_chunks += 1
            return chunk_id
        stored = self.chunks.put(chunk_id, data, durable=False, compress=self.worth_compressing(data))
        zeros = zero_block_bytes(data)
        with self._lock:
            stats.new_chunks += 1
            stats.new_bytes += len(data)
            stats.stored_bytes += stored
            stats.new_zero_bytes += zeros
        return chunk_id

    def reuse(self, chunk_id: bytes, stats: _DiskStats) -> bool:
        """Keep a chunk of the base index without reading it; False if it is gone from the repository."""
        if chunk_id == ZERO_ID:
            stats.zero_chunks += 1
            return True
        with self._lock:
            known = chunk_id in self._written
        if known or self.chunks.claim_existing(chunk_id):
            with self._lock:
                self._written.add(chunk_id)
            stats.reused_chunks += 1
            return True
        return False


def _chunks_to_read(source: DiskSource, index: FixedIndex, base: FixedIndex | None) -> tuple[list[int], set[int], str]:
    """Which chunks must be read, which come unchanged from the base, and how that was decided."""
    allocated = source.allocated()
    with_data = chunks_touched(allocated, index.chunk_size)
    changed = source.changed() if base is not None else None
    if base is None or changed is None:
        mode = "full read" if base is None else "full read, compared with the previous restore point"
        return sorted(with_data), set(), mode
    dirty = chunks_touched(changed, index.chunk_size)
    to_read = sorted(with_data & dirty)
    # Chunks outside the dirty ranges keep the base's entry (zero where no longer allocated).
    unchanged = set(range(len(index.ids))) - dirty
    return to_read, unchanged, "changed blocks only"


def run_backup(
    repository: Repository,
    request: BackupRequest,
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> RestorePoint:
    """Back up every source of the request and commit one restore point with all its disks."""
    if request.consistency not in CONSISTENCY_LEVELS:
        raise ValueError(f"unknown consistency level {request.consistency}")
    workers = workers or default_workers(repository.backend)
    started = time.monotonic()
    rp_id = request.restore_point_id or repository.new_restore_point_id()
    writer = _ChunkWriter(repository)
    chunk_size = repository.chunk_size
    say = log or (lambda _msg: None)
    disks: list[DiskRecord] = []
    indexes: dict[int, FixedIndex] = {}

    with repository_lock(repository.backend, "backup"), ThreadPoolExecutor(workers) as pool:
        for number, source in enumerate(request.sources):
            index = FixedIndex.empty(source.size, chunk_size)
            base_index = _base_index(repository, request, number, source, say)
            to_read, unchanged, mode = _chunks_to_read(source, index, base_index)
            say(f"disk {number} ({source.name}): {mode}")
            stats = _DiskStats()
            if base_index is not None:
                for n in sorted(unchanged):
                    if not writer.reuse(base_index.ids[n], stats):
                        to_read.append(n)  # the base's chunk is gone: read it again
                to_read.sort()
            if progress:
                progress(source.size - sum(index.chunk_range(n)[1] for n in to_read))
            in_flight = in_flight_limit(workers, chunk_size)
            _read_and_store(source, index, to_read, writer, stats, pool, in_flight, progress)
            for n in unchanged:
                if n not in to_read:
                    index.ids[n] = base_index.ids[n]
            indexes[number] = index
            disks.append(
                DiskRecord(
                    number=number,
                    name=source.name,
                    size=source.size,
                    chunk_size=chunk_size,
                    index=repository.index_name(rp_id, number),
                    metadata={
                        "read_mode": mode,
                        "new_zero_bytes": stats.new_zero_bytes,
                        **request.disk_metadata.get(number, {}),
                    },
                    **{k: v for k, v in stats.__dict__.items() if k != "new_zero_bytes"},
                )
            )
        restore_point = RestorePoint(
            id=rp_id,
            name=request.name,
            created=utc_now(),
            source=request.source_info,
            disks=disks,
            consistency=request.consistency,
            parent=request.base.id if request.base else None,
            host=socket.gethostname(),
            duration_seconds=round(time.monotonic() - started, 3),
            metadata=request.metadata,
        )
        _fault_point("before-commit")
        repository.commit(restore_point, indexes)
    return restore_point


def _fault_point(name: str) -> None:
    """Testing aid: SUREPOINT_FAULT=<name> kills the process here, as a crash or power cut would."""
    if os.environ.get("SUREPOINT_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _base_index(
    repository: Repository,
    request: BackupRequest,
    number: int,
    source: DiskSource,
    say: Callable[[str], None],
) -> FixedIndex | None:
    base = request.base
    if base is None or not request.use_base:
        return None
    disk = next((d for d in base.disks if d.number == number), None)
    if disk is None or disk.size != source.size or disk.chunk_size != repository.chunk_size:
        say(f"disk {number}: size or layout changed since restore point {base.id}: reading everything")
        return None
    try:
        return repository.load_index(base, number)
    except Exception as exc:  # noqa: BLE001 - a bad base only costs a full read
        say(f"disk {number}: cannot use restore point {base.id} as base ({exc}): reading everything")
        return None


def _read_and_store(
    source: DiskSource,
    index: FixedIndex,
    to_read: list[int],
    writer: _ChunkWriter,
    stats: _DiskStats,
    pool: ThreadPoolExecutor,
    in_flight: int,
    progress: ProgressCallback | None,
) -> None:
    window = threading.BoundedSemaphore(in_flight)  # caps chunks held in memory
    pending: list[tuple[int, int, Future[bytes]]] = []
    errors: list[BaseException] = []

    def done(fut: Future[bytes], length: int) -> None:
        window.release()
        if fut.exception() is not None:
            errors.append(fut.exception())
        elif progress:
            progress(length)

    try:
        for n in to_read:
            if errors:
                break
            stop_point()  # in a VM backup this runs in a worker thread: a signal reaches it here
            checkpoint("backup-chunk")
            offset, length = index.chunk_range(n)
            window.acquire()
            try:
                data = source.read(offset, length)
            except BaseException:
                window.release()
                raise
            stats.read_bytes += length
            fut = pool.submit(writer.process, data, stats)
            fut.add_done_callback(lambda f, length=length: done(f, length))
            pending.append((n, length, fut))
    finally:
        for n, _length, fut in pending:
            try:
                index.ids[n] = fut.result()
            except BaseException as exc:  # noqa: BLE001 - the first error is raised below
                if not errors:
                    errors.append(exc)
    if errors:
        raise errors[0]
