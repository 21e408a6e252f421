"""Keep the C allocator from handing chunk buffers back to the kernel between chunks.

Every chunk a backup reads or a restore decompresses is a fresh megabyte-sized buffer. With
glibc's defaults such buffers are mapped and unmapped (or trimmed from the threads' arenas) over
and over, and each reuse costs a page fault and a zeroed page per 4 KiB: a 4 GiB restore spent 3.5 s of
system time with them and 2.0 s without. Raising the mmap and trim thresholds keeps the memory
of the in-flight window (a few dozen chunks) mapped for reuse; peak memory does not grow beyond
that window. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 256 << 20


def keep_chunk_buffers() -> bool:
    """Tune malloc for chunk-sized buffers; True if the allocator took the settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
