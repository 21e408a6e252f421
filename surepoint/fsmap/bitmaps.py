"""Runs of clear bits in little-endian allocation bitmaps, found with big-integer operations.

A bitmap of n bits becomes one Python int (bit i of the bitmap is bit i of the int); runs are
found by skipping whole runs at a time, so a 32768-bit group bitmap costs microseconds, not a
loop over every bit.
"""

from __future__ import annotations

from collections.abc import Iterator


def clear_runs(bitmap: bytes, nbits: int) -> Iterator[tuple[int, int]]:
    """Yield (first bit, count) for every run of clear (free) bits among the first `nbits`."""
    used = int.from_bytes(bitmap[: (nbits + 7) // 8], "little") | (-1 << nbits)
    pos = 0
    while pos < nbits:
        free = ~(used >> pos)
        if free == 0 or free & ((1 << (nbits - pos)) - 1) == 0:
            return
        start = pos + ((free & -free).bit_length() - 1)
        rest = used >> start
        length = (rest & -rest).bit_length() - 1  # the first set bit at or after start
        yield start, length
        pos = start + length


def count_clear(bitmap: bytes, nbits: int) -> int:
    """How many of the first `nbits` bits are clear."""
    used = int.from_bytes(bitmap[: (nbits + 7) // 8], "little") & ((1 << nbits) - 1)
    return nbits - used.bit_count()
