"""Random-access reads of a restore point's disks, chunk by chunk from the repository.

Chunks are fetched on demand, checked (ChunkStore.get), kept in a bounded LRU cache shared by all
disks of a mount, and fetched ahead in background threads while reads are sequential. A chunk
that is missing or fails its check is never cached and never replaced by zeros: the read fails
with ChunkReadError, naming the restore point, disk and byte range.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from surepoint.errors import DamagedData
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.manifest import DiskRecord, RestorePoint
from surepoint.repo.repository import Repository

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_READAHEAD_CHUNKS = 4
LOG_REPEAT_SECONDS = 60.0


class ChunkReadError(DamagedData):
    """A read touched a chunk that could not be fetched or failed its check."""

    def __init__(self, message: str, offset: int, length: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.length = length


class ChunkCache:
    """LRU cache of checked chunk plaintexts, bounded in bytes; concurrent fetches of one chunk are merged."""

    def __init__(self, fetch: Callable[[bytes], bytes], max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._fetch = fetch
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, chunk_id: bytes) -> bool:
        with self._lock:
            return chunk_id in self._data or chunk_id in self._inflight

    @property
    def size(self) -> int:
        return self._bytes

    def get(self, chunk_id: bytes) -> bytes:
        """The chunk's plaintext; raises what the fetch raised (nothing is cached then)."""
        with self._lock:
            data = self._data.get(chunk_id)
            if data is not None:
                self._data.move_to_end(chunk_id)
                self.hits += 1
                return data
            future = self._inflight.get(chunk_id)
            owner = future is None
            if owner:
                future = self._inflight[chunk_id] = Future()
                self.misses += 1
        assert future is not None
        if not owner:
            return future.result()
        try:
            data = self._fetch(chunk_id)
        except BaseException as exc:
            with self._lock:
                del self._inflight[chunk_id]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[chunk_id]
            self._insert(chunk_id, data)
        future.set_result(data)
        return data

    def _insert(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        if chunk_id in self._data:
            return
        self._data[chunk_id] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self._bytes -= len(old)


class Prefetcher:
    """Background threads that warm the cache with the chunks a sequential reader will want next."""

    def __init__(self, cache: ChunkCache, workers: int = 2) -> None:
        self.cache = cache
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started on first use: never before a fork
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, chunk_id: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="prefetch")
            self._pool.submit(self._one, chunk_id)

    def _one(self, chunk_id: bytes) -> None:
        if chunk_id in self.cache:
            return
        try:
            self.cache.get(chunk_id)
        except Exception:  # noqa: BLE001 - the foreground read fetches it again and reports the error
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class DiskReader:
    """Reads of one disk of a restore point: `read(offset, size)` returns exactly the disk's bytes."""

    def __init__(
        self,
        point: RestorePoint,
        disk: DiskRecord,
        index: FixedIndex,
        cache: ChunkCache,
        prefetcher: Prefetcher | None = None,
        readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS,
        log: Callable[[str], None] | None = None,
        point_exists: Callable[[], bool] | None = None,
    ) -> None:
        self.point = point
        self.point_exists = point_exists  # a chunk gone with its point is a forget, not damage
        self.disk = disk
        self.index = index
        self.size = index.disk_size
        self.chunk_size = index.chunk_size
        self.cache = cache
        self.prefetcher = prefetcher
        # Read-ahead that would not fit in the cache beside the chunk being read would only evict itself.
        fits = max(0, cache.max_bytes // max(1, self.chunk_size) - 2)
        self.readahead = min(readahead_chunks, fits)
        self.log = log
        self._zero = bytes(self.chunk_size)
        self._last_chunk = -1  # a read from the start of the disk counts as sequential
        self._streak = 0
        self._seq_lock = threading.Lock()
        self._logged: dict[int, float] = {}

    def describe(self) -> str:
        return f"restore point {self.point.id} ({self.point.name}) disk {self.disk.number} ({self.disk.name})"

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        first = offset // self.chunk_size
        last = (end - 1) // self.chunk_size
        self._note_access(first, last)
        parts = []
        for number in range(first, last + 1):
            chunk_start = number * self.chunk_size
            data = self._chunk(number, offset)
            lo = max(offset, chunk_start) - chunk_start
            hi = min(end, chunk_start + len(data)) - chunk_start
            parts.append(data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunk(self, number: int, read_offset: int) -> bytes:
        chunk_id = self.index.ids[number]
        start, length = self.index.chunk_range(number)
        if chunk_id == ZERO_ID:
            return self._zero[:length]
        try:
            data = self.cache.get(chunk_id)
            if len(data) != length:
                raise DamagedData(f"chunk {chunk_id.hex()[:16]} has {len(data)} bytes, the index wants {length}")
        except DamagedData as exc:
            why = str(exc)
            if self.point_exists is not None and not self.point_exists():
                why = f"restore point {self.point.id} was removed by a concurrent forget"
            message = (
                f"{self.describe()}: read at byte offset {read_offset} failed: "
                f"bytes {start}-{start + length - 1} (chunk {number}): {why}"
            )
            self._log_once(number, message)
            raise ChunkReadError(message, start, length) from None
        except OSError as exc:
            message = (
                f"{self.describe()}: read at byte offset {read_offset} failed: "
                f"bytes {start}-{start + length - 1} (chunk {number}): repository read error: {exc}"
            )
            self._log_once(number, message)
            raise ChunkReadError(message, start, length) from None
        return data

    def _log_once(self, number: int, message: str) -> None:
        """Log a failed chunk, but not again for every page the kernel retries within a minute."""
        if self.log is None:
            return
        now = time.monotonic()
        with self._seq_lock:
            if now - self._logged.get(number, -LOG_REPEAT_SECONDS) < LOG_REPEAT_SECONDS:
                return
            self._logged[number] = now
        self.log(message)

    def _note_access(self, first: int, last: int) -> None:
        """Detect sequential reads (each read in the chunk of the last one or the next); then read ahead."""
        if self.prefetcher is None or self.readahead <= 0:
            return
        with self._seq_lock:
            previous = self._last_chunk
            if previous - 1 <= first <= previous:
                # Still in the same chunk (prefetch was decided on entering it), or a late read of
                # the previous one from another FUSE thread.
                return
            if first == previous + 1:
                self._streak += 1
            else:
                self._streak = 0
            self._last_chunk = last
            if self._streak < 1:
                return
        stop = min(len(self.index.ids), last + 1 + self.readahead)
        for number in range(last + 1, stop):
            chunk_id = self.index.ids[number]
            if chunk_id != ZERO_ID and chunk_id not in self.cache:
                self.prefetcher.submit(chunk_id)


def make_fetch(repository: Repository) -> Callable[[bytes], bytes]:
    return repository.chunks.get
