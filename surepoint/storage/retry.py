"""Retry with exponential backoff and jitter for remote storage calls that fail for a passing reason.

Remote backends (S3) wrap every request: a lost connection, a timeout or a 5xx answer is retried
until a deadline, so a restarting endpoint or a flaky network costs time, not the job. What is
not transient (wrong credentials, a missing bucket) fails at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to try again: `deadline` seconds in all, delays doubling from `first_delay`."""

    deadline: float = 60.0
    first_delay: float = 0.2
    max_delay: float = 5.0

    def delays(self):
        """Successive sleep lengths (full jitter), endlessly; the caller stops at the deadline."""
        delay = self.first_delay
        while True:
            yield random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.max_delay)


class GaveUp(Exception):
    """Every attempt failed until the deadline; `last` is the final error."""

    def __init__(self, last: BaseException, attempts: int, seconds: float) -> None:
        super().__init__(str(last))
        self.last = last
        self.attempts = attempts
        self.seconds = seconds


def call_with_retry(
    call: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call()`, repeated after transient failures until `policy.deadline`; then GaveUp from the last error."""
    started = clock()
    attempts = 0
    delays = policy.delays()
    while True:
        attempts += 1
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            elapsed = clock() - started
            delay = next(delays)
            if elapsed + delay > policy.deadline:
                raise GaveUp(exc, attempts, elapsed) from exc
            sleep(delay)
