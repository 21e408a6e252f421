"""What the backup engine reads from: the DiskSource protocol (image files, devices and VM disks implement it)."""

from __future__ import annotations

from typing import Protocol

from surepoint.repo.extents import Extent


class DiskSource(Protocol):
    """One disk as the backup engine sees it.

    `allocated()` names the ranges that may hold data; everything else reads as zeros and is
    recorded without reading. `changed()` names the ranges that may differ from the base restore
    point (changed-block tracking); None means "unknown: read everything allocated". `read`
    returns exactly `length` bytes or raises SourceError.
    """

    name: str
    size: int

    def allocated(self) -> list[Extent]: ...

    def changed(self) -> list[Extent] | None: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...
