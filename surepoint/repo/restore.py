"""Restore one disk of a restore point to a file or block device, checking every chunk as it goes."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from surepoint.errors import DamagedData, SurepointError, TargetError
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


def _nonzero_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of SPARSE_BLOCK-sized blocks that are not all zeros."""
    zero = bytes(SPARSE_BLOCK)
    start = None
    for pos in range(0, len(data), SPARSE_BLOCK):
        block = data[pos : pos + SPARSE_BLOCK]
        if block == zero[: len(block)]:
            if start is not None:
                yield start, pos
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield start, len(data)


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

    def fetch(number: int) -> tuple[int, bytes | None]:
        chunk_id = index.ids[number]
        if chunk_id == ZERO_ID:
            return number, None
        try:
            return number, repository.chunks.get(chunk_id)
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
            # A sliding window: `in_flight` chunks are fetched, checked and decrypted ahead of the one
            # being written, in disk order, so the target is written sequentially and never waits
            # for a whole batch.
            numbers = iter(range(len(index.ids)))
            pending: collections.deque[Future[tuple[int, bytes | None]]] = collections.deque(
                pool.submit(fetch, n) for n in itertools.islice(numbers, in_flight_limit(workers, index.chunk_size))
            )
            while pending:
                number, data = pending.popleft().result()
                following = next(numbers, None)
                if following is not None:
                    pending.append(pool.submit(fetch, following))
                offset, length = index.chunk_range(number)
                if data is None:
                    if not sparse:
                        _pwrite_all(fd, zero[:length], offset, target)
                else:
                    if len(data) != length:
                        raise DamagedData(f"chunk at offset {offset} of disk {disk_number} has the wrong size")
                    if sparse:
                        for a, b in _nonzero_runs(data):
                            _pwrite_all(fd, memoryview(data)[a:b], offset + a, target)
                    else:
                        _pwrite_all(fd, data, offset, target)
                    written += length
                if progress:
                    progress(length)
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
