"""Log mode after-verify: once restore points are verified in full, prune the logs they kept."""

from __future__ import annotations

from collections.abc import Sequence

from surepoint.catalog import Catalog
from surepoint.consistency.logs import prune_if_verified
from surepoint.events import EventRecorder
from surepoint.jobs.progress import Log, no_log
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository


def prune_after_verify(
    repository: Repository,
    catalog: Catalog,
    points: Sequence[RestorePoint],
    *,
    inventory: str | None = None,
    events: EventRecorder | None = None,
    log: Log = no_log,
) -> int:
    """Prune the logs of those `points` now verified in full (a VM that a lab can boot also needs
    a passed recovery verification); the number of prunes done. Used after verify and lab verify."""
    recorder = events or EventRecorder(catalog, repository.id)
    done = 0
    for point in points:

        def sink(component: str, phase: str, outcome: str, message: str = "", _id: str = point.id) -> None:
            recorder.record(component, phase, outcome, message, restore_point=_id)
            log(f"  {_id} {component} {phase}: {outcome} {message}")

        done += prune_if_verified(catalog, repository.id, point, sink, inventory=inventory)
    return done
