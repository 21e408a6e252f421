"""What the free-space reader found in one region of a disk, and the errors it reports."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.repo.extents import Extent

ReadFn = Callable[[int, int], bytes]


class Status(enum.Enum):
    """How a backup treats a volume's blocks."""

    MAPPED = "free blocks skipped"  # a filesystem whose allocation maps were read and trusted
    SKIPPED = "skipped whole"  # swap: nothing in it survives a reboot
    READ = "read in full"  # not understood, or its metadata looked inconsistent


class NotUnderstood(Exception):
    """The volume holds something this reader does not know how to map: read it in full."""


class Inconsistent(Exception):
    """The volume's metadata disagrees with itself (checksum, counts, bounds): read it in full."""


@dataclass
class Volume:
    """One partition, logical volume or whole disk, and its free byte ranges (disk offsets)."""

    where: str  # "partition 2", "logical volume vg0/root", "whole disk"
    start: int
    size: int
    kind: str  # "ext4", "xfs", "swap", "LVM2 PV", "unknown"
    status: Status
    reason: str = ""
    free: list[Extent] = field(default_factory=list)

    @property
    def free_bytes(self) -> int:
        return sum(e.length for e in self.free)

    def describe(self) -> str:
        text = f"{self.where}: {self.kind}, {self.status.value}"
        if self.status is not Status.READ:
            text += f" ({self.free_bytes} of {self.size} bytes free)"
        if self.reason:
            text += f": {self.reason}"
        return text

    def as_dict(self) -> dict:
        return {
            "where": self.where,
            "kind": self.kind,
            "status": self.status.name.lower(),
            "size": self.size,
            "free_bytes": self.free_bytes,
            "reason": self.reason,
        }


def bounded_read(read: ReadFn, size: int) -> ReadFn:
    """A reader confined to [0, size): metadata that points outside its volume is inconsistent."""

    def inner(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > size:
            raise Inconsistent(f"metadata points outside the volume (bytes {offset}+{length} of {size})")
        data = read(offset, length)
        if len(data) != length:
            raise Inconsistent(f"short read at offset {offset}")
        return data

    return inner
