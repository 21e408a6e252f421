"""Failed-login throttling: password guessing against the API and the console slows to a stop.

Failures are counted per (user name, client address) and per client address alone, over a sliding
window. Past the limit, further attempts from that pair (or that address) are refused without
checking the password until the window has passed since the last failure. Counting the pair, not the
name alone, keeps one attacker from locking a real user out from everywhere; the per-address count
stops one address from walking through many names. A successful login clears its pair's count, not
the address's. Counts live in memory: a server restart forgets them, which is documented.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

PAIR_LIMIT = 5
ADDRESS_LIMIT = 20
WINDOW_SECONDS = 300.0
MAX_ENTRIES = 10_000


class LoginThrottle:
    def __init__(
        self,
        pair_limit: int = PAIR_LIMIT,
        address_limit: int = ADDRESS_LIMIT,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pair_limit = pair_limit
        self.address_limit = address_limit
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[tuple, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: tuple, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.window]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def wait_seconds(self, name: str, address: str) -> float:
        """0 if a login attempt may be checked now; else the seconds until it may."""
        with self._lock:
            now = self.clock()
            waits = []
            for key, limit in ((("pair", name, address), self.pair_limit), (("address", address), self.address_limit)):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[-1] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, name: str, address: str) -> None:
        with self._lock:
            now = self.clock()
            for key in (("pair", name, address), ("address", address)):
                self._failures.setdefault(key, []).append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > MAX_ENTRIES:
                self._failures.popitem(last=False)

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._failures.pop(("pair", name, address), None)
