"""Retention policy (keep-last and grandfather-father-son): which restore points to keep, and why.

Pure functions over (id, time) pairs; each source name is judged on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def is_empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


@dataclass(frozen=True)
class Candidate:
    id: str
    time: datetime


BUCKETS: list[tuple[str, Callable[[datetime], tuple]]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
]


def apply_policy(candidates: Sequence[Candidate], policy: Policy) -> dict[str, list[str]]:
    """Map each kept id to the rules that keep it; ids not in the result are to be forgotten.

    Like restic and Proxmox Backup Server: newest first, keep-last keeps the N newest, and each
    periodic rule keeps the newest point of each of the N most recent periods that have one.
    An empty policy keeps everything (forgetting all by accident is not an option).
    """
    ordered = sorted(candidates, key=lambda c: (c.time, c.id), reverse=True)
    if policy.is_empty():
        return {c.id: ["no policy"] for c in ordered}
    reasons: dict[str, list[str]] = {}
    for c in ordered[: policy.last]:
        reasons.setdefault(c.id, []).append("last")
    for rule, bucket_of in BUCKETS:
        wanted = getattr(policy, rule)
        seen: set[tuple] = set()
        for c in ordered:
            if len(seen) >= wanted:
                break
            bucket = bucket_of(c.time)
            if bucket not in seen:
                seen.add(bucket)
                reasons.setdefault(c.id, []).append(rule)
    return reasons
