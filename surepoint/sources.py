"""Disk sources: what a backup reads from. A raw image file, a block device, or (later) a VM disk over NBD."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from surepoint.errors import SourceError
from surepoint.repo.extents import Extent, merge
from surepoint.repo.source import DiskSource

__all__ = ["DiskInfo", "DiskSource", "FileDiskSource"]


@dataclass
class DiskInfo:
    """What a backup records about a disk besides its data: free-form, kept in the manifest."""

    metadata: dict = field(default_factory=dict)


class FileDiskSource:
    """A raw disk image file or a block device, read with pread; holes found with SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.path = path
        self.name = name or os.path.basename(path.rstrip("/")) or path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"source {path!r} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {path!r} is not readable (permission denied)") from None
        except IsADirectoryError:
            raise SourceError(f"source {path!r} is a directory, not a disk image or block device") from None
        except OSError as exc:
            raise SourceError(f"cannot open source {path!r}: {exc.strerror}") from None
        mode = os.fstat(self._fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self._fd)
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file or block device"
            raise SourceError(f"source {path!r} is {what}: give a disk image file or a block device")
        self.is_block_device = stat.S_ISBLK(mode)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)

    def allocated(self) -> list[Extent]:
        if self.is_block_device:
            return [Extent(0, self.size)] if self.size else []
        extents: list[Extent] = []
        offset = 0
        try:
            while offset < self.size:
                try:
                    start = os.lseek(self._fd, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after offset
                    break
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
                extents.append(Extent(start, end - start))
                offset = end
        except OSError:
            return [Extent(0, self.size)]
        return merge(extents)

    def changed(self) -> list[Extent] | None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"read error on {self.path!r} at offset {offset}: {exc.strerror}") from None
        if len(data) < length:
            raise SourceError(f"{self.path!r} shrank while it was read (short read at offset {offset})")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
