"""Byte ranges of a disk: which parts hold data and which parts changed since a base restore point."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Extent:
    """A half-open byte range [offset, offset + length) of a disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort extents and join the ones that touch or overlap."""
    merged: list[Extent] = []
    for ext in sorted(e for e in extents if e.length > 0):
        if merged and ext.offset <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Extent(last.offset, max(last.end, ext.end) - last.offset)
        else:
            merged.append(ext)
    return merged


def chunks_touched(extents: Iterable[Extent], chunk_size: int) -> set[int]:
    """Indexes of the fixed-size chunks that any of the extents overlaps."""
    touched: set[int] = set()
    for ext in extents:
        if ext.length <= 0:
            continue
        touched.update(range(ext.offset // chunk_size, (ext.end - 1) // chunk_size + 1))
    return touched


def iter_chunk_ranges(size: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """Yield (chunk number, offset, length) for every chunk of a disk of `size` bytes."""
    for number, offset in enumerate(range(0, size, chunk_size)):
        yield number, offset, min(chunk_size, size - offset)
