"""Change signals: restore points whose changed data suddenly looks encrypted.

Ransomware rewrites files with ciphertext, which no compressor can shrink. Every backup already
knows how much new data it stored and how small compression made it, so a point whose new data is
large and incompressible, where the same system's earlier changes compressed well, is flagged.
Media, archives and packages are incompressible too, which is why the comparison is with the
system's own history and why a small change never counts.

All-zero 4 KiB blocks inside new chunks (free space the backup did not read, holes) are left out
of the comparison: they compress to nothing and would make a chunk that is half ciphertext look
half compressible.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from surepoint.repo.manifest import RestorePoint

MIN_CHANGE = 16 << 20  # bytes of new data below which nothing is judged
MIN_CHANGE_SHARE = 0.005  # ... nor below this share of the disks
INCOMPRESSIBLE = 0.85  # stored / new data at or above this: looks like ciphertext (mixed with some metadata)
USUAL_AT_MOST = 0.70  # the system's usual ratio must be below this for a jump to mean anything
JUMP = 0.15  # ... and this far below the point's ratio
HISTORY = 10  # earlier points of the same name that make up "usual"


@dataclass(frozen=True)
class ChangeStats:
    new_bytes: int
    stored_bytes: int
    disk_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.new_bytes if self.new_bytes else 0.0

    @classmethod
    def of(cls, point: RestorePoint) -> ChangeStats:
        """New data without its all-zero blocks (recorded by the backup as `new_zero_bytes`), as stored."""
        new = sum(max(0, d.new_bytes - _zero_bytes(d.metadata)) for d in point.disks)
        return cls(new, sum(d.stored_bytes for d in point.disks), point.size)


def _zero_bytes(metadata: dict) -> int:
    value = metadata.get("new_zero_bytes", 0) if isinstance(metadata, dict) else 0
    return value if isinstance(value, int) and value >= 0 else 0


def suspicious_points(points: Iterable[RestorePoint]) -> dict[str, str]:
    """Restore point id -> why its changed data looks encrypted; points that look normal are absent."""
    by_name: dict[str, list[RestorePoint]] = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    found: dict[str, str] = {}
    for series in by_name.values():
        usual: list[float] = []
        for point in sorted(series, key=lambda p: p.created):
            stats = ChangeStats.of(point)
            reason = judge(stats, usual)
            if reason:
                found[point.id] = reason
            elif stats.new_bytes >= 1 << 20:
                usual = [*usual, stats.ratio][-HISTORY:]
    return found


def judge(stats: ChangeStats, usual_ratios: list[float]) -> str | None:
    """Why this change looks encrypted, given the ratios of the system's earlier changes; None if it does not."""
    if stats.new_bytes < max(MIN_CHANGE, MIN_CHANGE_SHARE * stats.disk_bytes) or not usual_ratios:
        return None
    usual = statistics.median(usual_ratios)
    if stats.ratio < INCOMPRESSIBLE or usual > USUAL_AT_MOST or stats.ratio - usual < JUMP:
        return None
    return (
        f"{_mib(stats.new_bytes)} of changed data does not compress (stored/new {stats.ratio:.2f}, "
        f"usually {usual:.2f}), as encrypted data does not"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
