"""Integrity verification: re-read stored chunks, check digest and authentication, map damage to disks.

It only reads and reports: recording the outcome (in the catalog) is the verify job's business
(surepoint/jobs/verify.py).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from surepoint.errors import DamagedData, RestorePointForgotten
from surepoint.interrupt import checkpoint
from surepoint.repo.ahead import Ahead
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.extents import Extent, merge
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.manifest import DiskRecord, RestorePoint
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


def _indexes(
    repository: Repository, point: RestorePoint, index_damage: dict[str, list[DamagedRange]]
) -> Iterator[tuple[DiskRecord, FixedIndex]]:
    """The point's disks with their indexes; an unreadable index is recorded as damage to the whole disk."""
    for disk in point.disks:
        try:
            index = repository.load_index(point, disk.number)
        except RestorePointForgotten:
            continue  # forgotten since it was listed: nothing to check
        except DamagedData as exc:
            index_damage[point.id].append(DamagedRange(disk.number, 0, disk.size, str(exc)))
            continue
        yield disk, index


def plan_chunks(
    repository: Repository, points: Sequence[RestorePoint]
) -> tuple[dict[bytes, list[tuple[str, int, int]]], dict[str, list[DamagedRange]]]:
    """Where each chunk is used: id -> [(restore point, disk, chunk number)]; and damage found in indexes."""
    uses: dict[bytes, list[tuple[str, int, int]]] = defaultdict(list)
    index_damage: dict[str, list[DamagedRange]] = defaultdict(list)
    for point in points:
        for disk, index in _indexes(repository, point, index_damage):
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
    skip = skip if isinstance(skip, set | frozenset) else frozenset(skip)
    with repository.reading(points, "verify", "verify", require_all=False) as gone:
        points = [p for p in points if p.id not in gone]
        report = _verify(repository, points, sample, skip, workers, progress, on_plan)
    report.forgotten = list(gone)
    return report


@dataclass
class _Plan:
    """What the points use, compactly: one entry per distinct chunk, whatever the number of points."""

    owners: dict[bytes, int]  # chunk id -> bit mask of the points (by position) that use it
    distinct: list[int]  # per point: distinct chunks it uses that are not skipped
    index_damage: dict[str, list[DamagedRange]]


def _plan(repository: Repository, points: Sequence[RestorePoint], skip: Collection[bytes]) -> _Plan:
    owners: dict[bytes, int] = {}
    distinct = [0] * len(points)
    index_damage: dict[str, list[DamagedRange]] = defaultdict(list)
    for position, point in enumerate(points):
        bit = 1 << position
        for _disk, index in _indexes(repository, point, index_damage):
            for chunk_id in index.ids:
                mask = owners.get(chunk_id, 0)
                if not mask & bit and chunk_id != ZERO_ID:  # first time in this point
                    owners[chunk_id] = mask | bit
                    if chunk_id not in skip:
                        distinct[position] += 1
    return _Plan(owners, distinct, index_damage)


def _checked_per_point(plan: _Plan, candidates: Sequence[bytes], count: int) -> list[int]:
    """How many distinct chunks of each point a sample checked."""
    checked = [0] * count
    for chunk_id in candidates:
        mask = plan.owners[chunk_id]
        while mask:
            lowest = mask & -mask
            checked[lowest.bit_length() - 1] += 1
            mask ^= lowest
    return checked


def _where_damaged(
    repository: Repository, points: Sequence[RestorePoint], plan: _Plan, bad: dict[bytes, str]
) -> dict[str, list[DamagedRange]]:
    """The disk ranges of the damaged chunks: a second look at the indexes of the points that use them."""
    damage: dict[str, list[DamagedRange]] = defaultdict(list)
    affected = 0
    for chunk_id in bad:
        affected |= plan.owners[chunk_id]
    for position, point in enumerate(points):
        if not affected >> position & 1:
            continue
        by_problem: dict[tuple[int, str], list[Extent]] = defaultdict(list)
        for disk in point.disks:
            try:
                index = repository.load_index(point, disk.number)
            except (RestorePointForgotten, DamagedData):
                continue  # its damage is already recorded by the plan
            for number, chunk_id in enumerate(index.ids):
                problem = bad.get(chunk_id)
                if problem is not None:
                    offset = number * disk.chunk_size
                    by_problem[(disk.number, problem)].append(Extent(offset, min(disk.chunk_size, disk.size - offset)))
        for (disk_number, problem), extents in by_problem.items():
            for ext in merge(extents):
                damage[point.id].append(DamagedRange(disk_number, ext.offset, ext.length, problem))
    return damage


def _verify(
    repository: Repository,
    points: Sequence[RestorePoint],
    sample: float | None,
    skip: Collection[bytes],
    workers: int,
    progress: Callable[[int], None] | None,
    on_plan: Callable[[int], None] | None,
) -> VerifyReport:
    plan = _plan(repository, points, skip)
    candidates = [c for c in plan.owners if c not in skip] if skip else list(plan.owners)
    skipped = len(plan.owners) - len(candidates)
    sampled = sample is not None and sample < 1
    if sampled:
        count = max(1, round(len(candidates) * sample)) if candidates else 0
        candidates = random.sample(candidates, count)
    if on_plan:
        on_plan(len(candidates))

    def check(chunk_id: bytes) -> str | None:
        try:
            repository.chunks.get(chunk_id)
            return None
        except DamagedData as exc:
            return str(exc)

    bad: dict[bytes, str] = {}
    good: list[bytes] = []
    pool = ThreadPoolExecutor(workers)
    try:
        for chunk_id, problem in Ahead(pool, check, candidates, 4 * workers):
            if problem is None:
                good.append(chunk_id)
            else:
                bad[chunk_id] = problem
            if progress:
                progress(1)
            checkpoint("verify-chunk")
    finally:  # interrupted: the checks still queued are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)

    checked_per_point = _checked_per_point(plan, candidates, len(points)) if sampled else plan.distinct
    damage: dict[str, list[DamagedRange]] = defaultdict(list, {k: list(v) for k, v in plan.index_damage.items()})
    if bad:
        for point_id, ranges in _where_damaged(repository, points, plan, bad).items():
            damage[point_id].extend(ranges)

    results = []
    for position, point in enumerate(points):
        ranges = sorted(damage.get(point.id, []), key=lambda r: (r.disk, r.offset))
        if ranges:
            state = "damaged"
        elif sampled:
            state = "unchanged"
        else:
            state = "verified"
        results.append(PointResult(point.id, point.name, state, checked_per_point[position], ranges))
    return VerifyReport(
        results, len(candidates), skipped, len(bad), list(repository.damaged_manifests), good, list(bad)
    )
