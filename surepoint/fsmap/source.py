"""A disk source that reads the free blocks of its filesystems as zeros, without reading them.

The backup engine reads only what `allocated()` names, so free ranges drop out of it; chunks that
are partly free are read, and their free bytes replaced by zeros, so a deleted file's contents
never reach the repository and free space costs nothing to store.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from surepoint.fsmap.disk import DiskMap, map_disk
from surepoint.fsmap.volume import Status
from surepoint.repo.extents import Extent, merge
from surepoint.sources import DiskSource


def subtract(extents: Sequence[Extent], holes: Sequence[Extent]) -> list[Extent]:
    """The parts of `extents` outside `holes` (both lists sorted and merged)."""
    out: list[Extent] = []
    j = 0
    for ext in extents:
        pos = ext.offset
        while j < len(holes) and holes[j].end <= pos:
            j += 1
        k = j
        while k < len(holes) and holes[k].offset < ext.end:
            if holes[k].offset > pos:
                out.append(Extent(pos, holes[k].offset - pos))
            pos = max(pos, holes[k].end)
            k += 1
        if pos < ext.end:
            out.append(Extent(pos, ext.end - pos))
    return out


MIN_SKIP = 64 * 1024  # a free range inside a read shorter than this is read (and zeroed), not skipped


class FreeSpaceSkippingSource:
    """Wraps a DiskSource: free ranges are left out of allocated() and read back as zeros."""

    def __init__(self, source: DiskSource, free: Sequence[Extent]) -> None:
        self.source = source
        self.name = source.name
        self.size = source.size
        self.free = merge(free)
        self._starts = [e.offset for e in self.free]

    def allocated(self) -> list[Extent]:
        return subtract(merge(self.source.allocated()), self.free)

    def changed(self) -> list[Extent] | None:
        return self.source.changed()

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        small: list[tuple[int, int]] = []  # free but read anyway (then zeroed): one read beats many
        holes: list[tuple[int, int]] = []  # free ranges within this read, relative to offset
        while i < len(self.free) and self.free[i].offset < end:
            lo, hi = max(self.free[i].offset, offset), min(self.free[i].end, end)
            if hi - lo >= MIN_SKIP or (lo == offset and hi == end):
                holes.append((lo - offset, hi - offset))
            elif lo < hi:
                small.append((lo - offset, hi - offset))
            i += 1
        if not holes and not small:
            return self.source.read(offset, length)
        # Read only what is in use; gaps too small to be worth a separate read are read and zeroed.
        buf = bytearray(length)
        pos = 0
        for lo, hi in [*holes, (length, length)]:
            if lo > pos:
                buf[pos:lo] = self.source.read(offset + pos, lo - pos)
            pos = hi
        for lo, hi in small:
            buf[lo:hi] = bytes(hi - lo)
        return bytes(buf)

    def close(self) -> None:
        self.source.close()

    def __getattr__(self, name: str):
        return getattr(self.source, name)  # anything else a source offers (e.g. is_block_device)


def skip_free_space(
    sources: Sequence[DiskSource], log: Callable[[str], None] | None = None
) -> tuple[list[DiskSource], dict[int, dict]]:
    """Map every source's free space; the sources to back up instead and the per-disk metadata to record.

    A disk whose map cannot be made (a read error while mapping is the source's error and is
    raised) is backed up in full; what was skipped and why is said through `log` and recorded.
    """
    say = log or (lambda _m: None)
    wrapped: list[DiskSource] = []
    metadata: dict[int, dict] = {}
    for number, source in enumerate(sources):
        disk_map = map_disk(source.read, source.size)
        for line in describe(disk_map):
            say(f"disk {number} ({source.name}): {line}")
        metadata[number] = {"free_space": {"skipped_bytes": disk_map.free_bytes, "volumes": disk_map.summary()}}
        wrapped.append(FreeSpaceSkippingSource(source, disk_map.free) if disk_map.free else source)
    return wrapped, metadata


def describe(disk_map: DiskMap) -> list[str]:
    """One line per volume found, then the warnings."""
    lines = [v.describe() for v in disk_map.volumes]
    if not any(v.status is not Status.READ for v in disk_map.volumes):
        lines.append("no free space skipped: every volume is read in full")
    return lines + [f"warning: {w}" for w in disk_map.warnings]


def free_space_summary(metadata: dict[int, dict]) -> str:
    """One line for the job's events: what was skipped on each disk, and what was read in full and why."""
    parts = []
    for number, disk in sorted(metadata.items()):
        info = disk.get("free_space", {})
        volumes = info.get("volumes", [])
        read_in_full = [f"{v['where']} ({v['kind']}: {v['reason']})" for v in volumes if v["status"] == "read"]
        text = f"disk {number}: {info.get('skipped_bytes', 0)} bytes free skipped"
        understood = [f"{v['where']} ({v['kind']})" for v in volumes if v["status"] != "read"]
        if understood:
            text += " in " + ", ".join(understood)
        if read_in_full:
            text += "; read in full: " + ", ".join(read_in_full)
        parts.append(text)
    return "; ".join(parts)
