"""Integrity verification: re-read stored chunks, check digest and authentication, map damage to disks.

It only reads and reports: recording the outcome (in the catalog) is the verify job's business
(surepoint/jobs/verify.py).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from surepoint.errors import DamagedData, RestorePointForgotten
from surepoint.interrupt import checkpoint
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.extents import Extent, merge
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository


@dataclass
class DamagedRange:
    disk: int
    offset: int
    length: int
    reason: str


@dataclass
class PointResult:
    id: str
    name: str
    state: str  # verified | damaged | unchanged (a sample found nothing wrong)
    checked_chunks: int = 0
    damaged: list[DamagedRange] = field(default_factory=list)


@dataclass
class VerifyReport:
    points: list[PointResult]
    checked_chunks: int
    skipped_chunks: int
    damaged_chunks: int
    damaged_manifests: list[str]
    good_chunks: list[bytes] = field(default_factory=list, repr=False)  # checked and found intact
    bad_chunks: list[bytes] = field(default_factory=list, repr=False)  # checked and found damaged or missing
    forgotten: list[str] = field(default_factory=list)  # points a concurrent forget removed before the check

    @property
    def damaged(self) -> bool:
        return bool(self.damaged_chunks or self.damaged_manifests or any(p.state == "damaged" for p in self.points))

    def to_dict(self) -> dict:
        """The report as JSON-ready data (without the chunk ids)."""
        data = asdict(self)
        del data["good_chunks"], data["bad_chunks"]
        return data


def plan_chunks(
    repository: Repository, points: Sequence[RestorePoint]
) -> tuple[dict[bytes, list[tuple[str, int, int]]], dict[str, list[DamagedRange]]]:
    """Where each chunk is used: id -> [(restore point, disk, chunk number)]; and damage found in indexes."""
    uses: dict[bytes, list[tuple[str, int, int]]] = defaultdict(list)
    index_damage: dict[str, list[DamagedRange]] = defaultdict(list)
    for point in points:
        for disk in point.disks:
            try:
                index = repository.load_index(point, disk.number)
            except RestorePointForgotten:
                continue  # forgotten since it was listed: nothing to check
            except DamagedData as exc:
                index_damage[point.id].append(DamagedRange(disk.number, 0, disk.size, str(exc)))
                continue
            for number, chunk_id in enumerate(index.ids):
                if chunk_id != ZERO_ID:
                    uses[chunk_id].append((point.id, disk.number, number))
    return uses, index_damage


def verify(
    repository: Repository,
    points: Sequence[RestorePoint],
    *,
    sample: float | None = None,
    skip: Collection[bytes] = (),
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the chunks of `points` and return each point's state and the damage found.

    `sample` (0..1] checks a random share of chunks; `skip` names chunks not to check again (found
    good recently). A restore point becomes "verified" only when none of its chunks was left
    unchecked by sampling.

    The points are held by a reader lock while they are checked, so a concurrent `forget` keeps them
    and `gc` keeps their chunks: a missing chunk is damage, never a point pulled away mid-check. A
    point forgotten before the lock was in place is left out and named in `forgotten`.
    """
    with repository.reading(points, "verify", "verify", require_all=False) as gone:
        points = [p for p in points if p.id not in gone]
        report = _verify(repository, points, sample, skip, workers, progress, on_plan)
    report.forgotten = list(gone)
    return report


def _verify(
    repository: Repository,
    points: Sequence[RestorePoint],
    sample: float | None,
    skip: Collection[bytes],
    workers: int,
    progress: Callable[[int], None] | None,
    on_plan: Callable[[int], None] | None,
) -> VerifyReport:
    uses, index_damage = plan_chunks(repository, points)
    candidates = list(uses)
    skipped = 0
    if skip:
        kept = [c for c in candidates if c not in skip]
        skipped, candidates = len(candidates) - len(kept), kept
    sampled = sample is not None and sample < 1
    if sampled:
        count = max(1, round(len(candidates) * sample)) if candidates else 0
        candidates = random.sample(candidates, count)
    if on_plan:
        on_plan(len(candidates))

    def check(chunk_id: bytes) -> tuple[bytes, str | None]:
        try:
            repository.chunks.get(chunk_id)
            return chunk_id, None
        except DamagedData as exc:
            return chunk_id, str(exc)

    bad: dict[bytes, str] = {}
    good: list[bytes] = []
    pool = ThreadPoolExecutor(workers)
    try:
        for chunk_id, problem in pool.map(check, candidates):
            if problem is None:
                good.append(chunk_id)
            else:
                bad[chunk_id] = problem
            if progress:
                progress(1)
            checkpoint("verify-chunk")
    finally:  # interrupted: the checks still queued are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)

    checked_per_point: dict[str, int] = defaultdict(int)
    for chunk_id in candidates:
        for point_id in {u[0] for u in uses[chunk_id]}:
            checked_per_point[point_id] += 1
    damage: dict[str, list[DamagedRange]] = defaultdict(list, {k: list(v) for k, v in index_damage.items()})
    by_disk: dict[tuple[str, int, str], list[Extent]] = defaultdict(list)
    for chunk_id, problem in bad.items():
        for point_id, disk, number in uses[chunk_id]:
            point = next(p for p in points if p.id == point_id)
            chunk_size = next(d.chunk_size for d in point.disks if d.number == disk)
            size = next(d.size for d in point.disks if d.number == disk)
            offset = number * chunk_size
            by_disk[(point_id, disk, problem)].append(Extent(offset, min(chunk_size, size - offset)))
    for (point_id, disk, problem), extents in by_disk.items():
        for ext in merge(extents):
            damage[point_id].append(DamagedRange(disk, ext.offset, ext.length, problem))

    results = []
    for point in points:
        ranges = sorted(damage.get(point.id, []), key=lambda r: (r.disk, r.offset))
        if ranges:
            state = "damaged"
        elif sampled:
            state = "unchanged"
        else:
            state = "verified"
        results.append(PointResult(point.id, point.name, state, checked_per_point.get(point.id, 0), ranges))
    return VerifyReport(
        results, len(candidates), skipped, len(bad), list(repository.damaged_manifests), good, list(bad)
    )
