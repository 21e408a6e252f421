"""The on-demand disk reader (no root needed): exact bytes, LRU bound, read-ahead, damaged chunks."""

from __future__ import annotations

import os
import threading
import time

import pytest

from surepoint.errors import DamagedData
from surepoint.mount.reader import ChunkCache, ChunkReadError, DiskReader, Prefetcher
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.manifest import DiskRecord, RestorePoint

CHUNK = 64 << 10


def _disk(data: bytes, zero_chunks: set[int] = frozenset()):
    """A fake store and index for `data` (chunk id = chunk number as 32 bytes)."""
    store = {}
    ids = []
    for n in range(0, len(data), CHUNK):
        number = n // CHUNK
        if number in zero_chunks:
            ids.append(ZERO_ID)
            continue
        cid = number.to_bytes(4, "big") + b"\1" * 28
        store[cid] = data[n : n + CHUNK]
        ids.append(cid)
    index = FixedIndex(len(data), CHUNK, ids)
    point = RestorePoint("abcdef0123456789", "guest", "2026-01-01T00:00:00Z", {}, [])
    disk = DiskRecord(0, "guest.img", len(data), CHUNK, "indexes/x.0")
    return store, index, point, disk


def _fetcher(store, calls, delay=0.0):
    def fetch(cid: bytes) -> bytes:
        calls.append(cid)
        if delay:
            time.sleep(delay)
        if cid not in store:
            raise DamagedData(f"chunk {cid.hex()[:16]} is missing from the repository")
        return store[cid]

    return fetch


def test_reads_are_exact_across_chunk_boundaries_and_zero_chunks():
    data = bytearray(os.urandom(10 * CHUNK + 1234))
    data[3 * CHUNK : 4 * CHUNK] = bytes(CHUNK)
    data = bytes(data)
    store, index, point, disk = _disk(data, zero_chunks={3})
    calls = []
    reader = DiskReader(point, disk, index, ChunkCache(_fetcher(store, calls), 1 << 20))
    for offset, size in [(0, 10), (CHUNK - 5, 10), (2 * CHUNK, 3 * CHUNK), (len(data) - 7, 100), (len(data), 5)]:
        assert reader.read(offset, size) == data[offset : offset + size]
    assert ZERO_ID not in calls


def test_cache_is_bounded_and_lru():
    data = os.urandom(20 * CHUNK)
    store, index, point, disk = _disk(data)
    calls = []
    cache = ChunkCache(_fetcher(store, calls), 4 * CHUNK)
    reader = DiskReader(point, disk, index, cache)
    for n in range(20):
        reader.read(n * CHUNK, 10)
    assert cache.size <= 4 * CHUNK
    calls.clear()
    reader.read(19 * CHUNK, 10)  # recent: cached
    assert calls == []
    reader.read(0, 10)  # evicted
    assert len(calls) == 1


def test_missing_chunk_raises_names_the_range_and_is_not_cached():
    data = os.urandom(8 * CHUNK)
    store, index, point, disk = _disk(data)
    victim = index.ids[5]
    saved = store.pop(victim)
    logged = []
    calls = []
    reader = DiskReader(point, disk, index, ChunkCache(_fetcher(store, calls), 1 << 20), log=logged.append)
    with pytest.raises(ChunkReadError) as exc:
        reader.read(5 * CHUNK + 100, 10)
    assert isinstance(exc.value, DamagedData)
    message = str(exc.value)
    assert point.id in message and f"bytes {5 * CHUNK}-{6 * CHUNK - 1}" in message
    assert f"offset {5 * CHUNK + 100}" in message
    assert logged == [message]
    with pytest.raises(ChunkReadError):  # logged once per minute, raised every time
        reader.read(5 * CHUNK, 10)
    assert len(logged) == 1
    # neighbours still read; and once the chunk is back, it is read (the failure was not cached)
    assert reader.read(4 * CHUNK, CHUNK) == data[4 * CHUNK : 5 * CHUNK]
    store[victim] = saved
    assert reader.read(5 * CHUNK, CHUNK) == data[5 * CHUNK : 6 * CHUNK]


def test_wrong_length_chunk_is_damage():
    data = os.urandom(4 * CHUNK)
    store, index, point, disk = _disk(data)
    store[index.ids[1]] = store[index.ids[1]][:-1]
    reader = DiskReader(point, disk, index, ChunkCache(_fetcher(store, []), 1 << 20))
    with pytest.raises(ChunkReadError):
        reader.read(CHUNK, 1)


def test_sequential_reads_prefetch_ahead_random_reads_do_not():
    data = os.urandom(32 * CHUNK)
    store, index, point, disk = _disk(data)
    calls = []
    cache = ChunkCache(_fetcher(store, calls, delay=0.01), 1 << 22)
    prefetcher = Prefetcher(cache, workers=2)
    try:
        reader = DiskReader(point, disk, index, cache, prefetcher, readahead_chunks=4)
        reader.read(0, 4096)
        reader.read(CHUNK, 4096)  # second chunk in a row: sequential
        deadline = time.monotonic() + 5
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {index.ids[n] for n in range(2, 6)} <= set(calls)
        calls.clear()
        reader.read(20 * CHUNK, 10)  # a jump: no read-ahead
        time.sleep(0.1)
        assert calls == [index.ids[20]]
    finally:
        prefetcher.close()


def test_concurrent_reads_of_one_chunk_fetch_it_once():
    data = os.urandom(2 * CHUNK)
    store, index, point, disk = _disk(data)
    calls = []
    cache = ChunkCache(_fetcher(store, calls, delay=0.1), 1 << 20)
    reader = DiskReader(point, disk, index, cache)
    results = []
    threads = [threading.Thread(target=lambda: results.append(reader.read(100, 50))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data[100:150]] * 8
    assert len(calls) == 1
