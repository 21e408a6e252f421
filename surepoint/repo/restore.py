"""Restore one disk of a restore point to a file or block device, checking every chunk as it goes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from surepoint.errors import DamagedData, SurepointError, TargetError
from surepoint.repo.ahead import Ahead
from surepoint.repo.backup import default_workers, in_flight_limit
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository

SPARSE_BLOCK = 64 << 10  # zero runs of this size inside a chunk are left as holes in a new file


@dataclass
class RestoreResult:
    target: str
    size: int
    written_bytes: int
    sparse_bytes: int


def _open_target(target: str, size: int, overwrite: bool) -> tuple[int, bool, str]:
    """Open the target; return (fd, is_new_regular_file, path written to before the final rename)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        device_size = os.lseek(fd, 0, os.SEEK_END)
        if device_size < size:
            os.close(fd)
            raise TargetError(f"target {target} is too small: {device_size} bytes, the disk needs {size}")
        return fd, False, target
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise TargetError(f"target {target} is a directory: give a file or block device path")
    if st is not None and not overwrite:
        raise TargetError(f"target {target} already exists: remove it or pass --overwrite")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise TargetError(f"directory {directory} does not exist")
    partial = target + ".surepoint-partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
    except OSError as exc:
        raise TargetError(f"cannot create {target}: {exc.strerror}") from None
    return fd, True, partial


_ZERO_SPARSE_BLOCK = bytes(SPARSE_BLOCK)


def _nonzero_runs(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the runs of SPARSE_BLOCK-sized blocks that are not all zeros.

    Compares in place (`startswith` with an offset copies nothing), after a one-byte test that
    settles most blocks of real data.
    """
    runs: list[tuple[int, int]] = []
    start = None
    size = len(data)
    for pos in range(0, size, SPARSE_BLOCK):
        end = min(pos + SPARSE_BLOCK, size)
        zero = data[pos] == 0 and data[end - 1] == 0 and data.startswith(_ZERO_SPARSE_BLOCK[: end - pos], pos)
        if zero:
            if start is not None:
                runs.append((start, pos))
                start = None
        elif start is None:
            start = pos
    if start is not None:
        runs.append((start, size))
    return runs


class _Writeback:
    """Starts the kernel writing restored data out as it goes, so the closing fsync waits on the tail only.

    Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues dirty pages for writing without waiting;
    elsewhere (or where it fails) this does nothing and the fsync does all the work.
    """

    STEP = 64 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start_writing = _sync_file_range_write()
        self.low: int | None = None
        self.high = 0

    def wrote(self, offset: int, length: int) -> None:
        self.low = offset if self.low is None else min(self.low, offset)
        self.high = max(self.high, offset + length)
        if self.high - self.low >= self.STEP:
            self.flush()

    def flush(self) -> None:
        if self.start_writing is not None and self.low is not None:
            self.start_writing(self.fd, self.low, self.high - self.low)
        self.low = None


@functools.cache
def _sync_file_range_write() -> Callable[[int, int, int], object] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library this process runs on
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, do not wait
    return lambda fd, offset, length: func(fd, offset, length, write)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, target: str) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise TargetError(f"write to {target} failed at offset {offset}: {exc.strerror}") from None
        view, offset = view[written:], offset + written


def restore_disk(
    repository: Repository,
    restore_point: RestorePoint,
    disk_number: int,
    target: str,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Write the disk's bytes to `target`; a file target appears only when every chunk checked out."""
    index: FixedIndex = repository.load_index(restore_point, disk_number)
    fd, sparse, write_path = _open_target(target, index.disk_size, overwrite)
    written = 0
    workers = workers or default_workers(repository.backend)
    zero = bytes(index.chunk_size)

    def fetch(number: int) -> tuple[bytes | None, list[tuple[int, int]]]:
        chunk_id = index.ids[number]
        if chunk_id == ZERO_ID:
            return None, []
        try:
            data = repository.chunks.get(chunk_id)
            # the zero test runs here, in the workers, not in the thread that writes
            return data, _nonzero_runs(data) if sparse else [(0, len(data))]
        except DamagedData as exc:
            offset, length = index.chunk_range(number)
            if not repository.backend.exists(f"restorepoints/{restore_point.id}"):
                raise SurepointError(
                    f"restore point {restore_point.id} was removed by a concurrent forget while it was being "
                    f"restored; nothing was restored to {target}" + ("" if sparse else " beyond that point")
                ) from None
            raise DamagedData(
                f"restore point {restore_point.id} disk {disk_number} bytes {offset}-{offset + length - 1}: "
                f"{exc}; nothing was restored to {target}" + ("" if sparse else " beyond that point")
            ) from None

    try:
        reading = repository.reading([restore_point], "restore", f"restore to {target}")
        with reading, ThreadPoolExecutor(workers) as pool:
            # `in_flight` chunks are fetched, checked and decrypted ahead of the one being written,
            # in disk order, so the target is written sequentially and never waits for a whole batch.
            ahead = Ahead(pool, fetch, range(len(index.ids)), in_flight_limit(workers, index.chunk_size))
            writeback = _Writeback(fd)
            for number, (data, runs) in ahead:
                offset, length = index.chunk_range(number)
                if data is None:
                    if not sparse:
                        _pwrite_all(fd, zero[:length], offset, target)
                        writeback.wrote(offset, length)
                else:
                    if len(data) != length:
                        raise DamagedData(f"chunk at offset {offset} of disk {disk_number} has the wrong size")
                    view = memoryview(data)
                    for a, b in runs:
                        _pwrite_all(fd, view[a:b], offset + a, target)
                        writeback.wrote(offset + a, b - a)
                    written += length
                if progress:
                    progress(length)
            writeback.flush()
        try:
            os.fsync(fd)
        except OSError as exc:
            raise TargetError(f"flushing {target} failed: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        if sparse:
            _remove_quietly(write_path)
        raise
    os.close(fd)
    if sparse:
        try:
            os.rename(write_path, target)
        except OSError as exc:
            _remove_quietly(write_path)
            raise SurepointError(f"cannot move restored image into place at {target}: {exc.strerror}") from None
    return RestoreResult(target, index.disk_size, written, index.disk_size - written)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
