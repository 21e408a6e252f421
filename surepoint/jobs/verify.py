"""Verify restore points and record the outcome in the catalog (the repository itself only reports)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

from surepoint.catalog import Catalog
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repair import RepairReport, repair
from surepoint.repo.repository import Repository
from surepoint.repo.verify import VerifyReport, verify


def verify_and_record(
    repository: Repository,
    points: Sequence[RestorePoint],
    catalog: Catalog,
    *,
    sample: float | None = None,
    since: str | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the chunks of `points` and record each point's state and each chunk's check in the catalog.

    `since` (an ISO time) skips chunks the catalog says were found good at or after it; `sample`
    is passed to `repo.verify.verify`.
    """
    skip = catalog.chunks_checked_since(repository.id, since) if since else set()
    count = _Count(progress, on_plan)
    with at_stake(
        count.state("no verification result was recorded (run verify again)"), _recorder(catalog, repository)
    ):
        report = verify(
            repository, points, sample=sample, skip=skip, workers=workers, progress=count.advance, on_plan=count.plan
        )
    record(catalog, repository.id, report)
    return report


class _Count:
    """Chunks checked so far, for the line an interruption prints."""

    def __init__(self, progress: Callable[[int], None] | None, on_plan: Callable[[int], None] | None) -> None:
        self.done = 0
        self.total: int | None = None
        self._progress, self._on_plan = progress, on_plan

    def plan(self, total: int) -> None:
        self.total = total
        if self._on_plan:
            self._on_plan(total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress:
            self._progress(n)

    def state(self, rest: str) -> Callable[[], str]:
        return lambda: f"{self.done} of {self.total if self.total is not None else '?'} chunks checked; {rest}"


def _recorder(catalog: Catalog, repository: Repository) -> Callable[[str], None]:
    events = EventRecorder(catalog, repository.id)
    return lambda message: events.record(Component.REPOSITORY, Phase.VERIFY, Outcome.FAILED, message)


def record(catalog: Catalog, repository_id: str, report: VerifyReport) -> None:
    """Chunk check times and the integrity state of every point that was fully checked or found damaged."""
    catalog.record_chunk_checks(repository_id, report.good_chunks)
    catalog.forget_chunk_checks(repository_id, report.bad_chunks)
    for point in report.points:
        if point.state != "unchanged":
            catalog.record_verification(
                repository_id, point.id, "integrity", point.state, {"damaged": [asdict(r) for r in point.damaged]}
            )


def repair_and_record(
    repository: Repository,
    points: Sequence[RestorePoint],
    catalog: Catalog,
    *,
    other: Repository | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RepairReport:
    """Verify every chunk of `points`, repair what can be (repo/repair.py), record states and events.

    A point found damaged earlier (in the catalog) and whole now is recorded `healed`."""
    before = {p.id: (catalog.latest_verification(repository.id, p.id, "integrity") or {}).get("state") for p in points}
    count = _Count(progress, on_plan)
    with at_stake(count.state("nothing was repaired or recorded (run it again)"), _recorder(catalog, repository)):
        found = verify(repository, points, workers=workers, progress=count.advance, on_plan=count.plan)
    catalog.record_chunk_checks(repository.id, found.good_chunks)
    catalog.forget_chunk_checks(repository.id, found.bad_chunks)
    stake = "repair stopped: chunks quarantined so far stay in quarantine/, run verify --repair again to finish"
    with at_stake(stake, _recorder(catalog, repository)):
        report = repair(repository, points, found, other=other, log=log)
    events = EventRecorder(catalog, repository.id)
    for point in report.points:
        if point.state == "verified" and before.get(point.id) in ("damaged", "healed"):
            point.state = "healed"
        details = {"damaged": [asdict(r) for r in point.damaged], "lost": [asdict(r) for r in point.lost]}
        catalog.record_verification(repository.id, point.id, "integrity", point.state, details)
        if point.state == "healed":
            events.record(Component.REPOSITORY, Phase.VERIFY, Outcome.OK, "healed", restore_point=point.id)
        elif point.state == "damaged":
            what = f"{len(point.lost)} range(s) lost, {len(point.damaged)} still damaged"
            events.record(Component.REPOSITORY, Phase.VERIFY, Outcome.FAILED, what, restore_point=point.id)
    return report
