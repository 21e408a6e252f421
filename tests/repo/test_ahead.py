"""Ahead: results in the order of the sequence, never more than `depth` items ahead, and an
abandoned window cancels what has not begun."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from surepoint.repo.ahead import Ahead


def test_results_come_back_in_order_and_never_more_than_depth_ahead():
    started = []
    lock = threading.Lock()

    def work(n: int) -> int:
        with lock:
            started.append(n)
        return n * n

    with ThreadPoolExecutor(4) as pool:
        seen = []
        for n, square in Ahead(pool, work, range(100), 5):
            assert square == n * n
            with lock:
                assert len(started) <= len(seen) + 1 + 5  # this item, plus five ahead of it at most
            seen.append(n)
    assert seen == list(range(100))


def test_abandon_cancels_what_has_not_begun_and_returns_what_has():
    running = threading.Event()
    release = threading.Event()

    def work(n: int) -> int:
        if n == 0:
            running.set()
            release.wait(30)
        return n

    with ThreadPoolExecutor(1) as pool:
        ahead = Ahead(pool, work, range(10), 4)
        assert running.wait(30)
        started = ahead.abandon()
        release.set()
        assert [item for item, _future in started] == [0]
        assert started[0][1].result() == 0
        assert list(ahead) == []


def test_an_error_is_raised_in_order():
    def work(n: int) -> int:
        if n == 3:
            raise ValueError("three")
        return n

    with ThreadPoolExecutor(2) as pool:
        ahead = Ahead(pool, work, range(6), 2)
        got = []
        try:
            for n, _ in ahead:
                got.append(n)
        except ValueError as exc:
            assert str(exc) == "three"
        assert got == [0, 1, 2]
        assert [item for item, _ in ahead.abandon()][0] == 3  # the failed item stays for the caller
