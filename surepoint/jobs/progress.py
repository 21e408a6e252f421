"""How jobs report progress: a factory called with the total once it is known, returning `advance(n)`."""

from __future__ import annotations

from collections.abc import Callable

Advance = Callable[[int], None]
ProgressFactory = Callable[[int], Advance]
Log = Callable[[str], None]


def no_log(_message: str) -> None:
    """A log callback that drops every line."""
