"""Linux swap areas: nothing in them outlives the running system, so all but the header is skipped.

A swap area that holds a hibernation image has its signature replaced (S1SUSPEND, LINHIB0001...)
and is not recognised here, so it is read in full and the image survives.
"""

from __future__ import annotations

from surepoint.fsmap.volume import ReadFn
from surepoint.repo.extents import Extent

SIGNATURES = (b"SWAPSPACE2", b"SWAP-SPACE")
PAGE_SIZES = (4096, 8192, 16384, 65536)


def page_size(read: ReadFn, size: int) -> int | None:
    """The page size the swap header was written with, or None if this is not a swap area."""
    for page in PAGE_SIZES:
        if size >= 2 * page and read(page - 10, 10) in SIGNATURES:
            return page
    return None


def free_extents(read: ReadFn, size: int) -> list[Extent]:
    """Everything after the header page (which keeps the label, UUID and signature)."""
    page = page_size(read, size)
    if page is None:
        return []
    return [Extent(page, size - page)]
