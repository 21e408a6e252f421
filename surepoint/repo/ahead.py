"""Work done a few items ahead: a thread pool fed a bounded window, results taken back in order.

Restore, verify and gc each walk a long sequence (chunks of a disk, chunks to check, chunks to
remove) where every item waits on storage. `Ahead` keeps `depth` items in flight and hands the
results back in the order of the sequence, so memory stays flat however long it is (one future
per item up front would not).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Ahead(Generic[Item, Result]):
    """Iterate to get `(item, fn(item))` in order; `fn` runs on `pool`, `depth` items ahead."""

    def __init__(self, pool: Executor, fn: Callable[[Item], Result], items: Iterable[Item], depth: int) -> None:
        self._pool = pool
        self._fn = fn
        self._items = iter(items)
        self._window: collections.deque[tuple[Item, Future[Result]]] = collections.deque(
            (item, pool.submit(fn, item)) for item in itertools.islice(self._items, max(1, depth))
        )

    def __iter__(self) -> Iterator[tuple[Item, Result]]:
        while self._window:
            item, future = self._window[0]
            result = future.result()  # an error leaves the item in the window (see abandon)
            self._window.popleft()
            following = next(self._items, None)
            if following is not None:
                self._window.append((following, self._pool.submit(self._fn, following)))
            yield item, result

    def abandon(self) -> list[tuple[Item, Future[Result]]]:
        """Cancel what has not begun; return what was already under way or done (its future ends)."""
        started = [(item, future) for item, future in self._window if not future.cancel()]
        self._window.clear()
        return started
