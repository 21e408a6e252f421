"""Garbage collection as a job: sweep what no restore point refers to, and record it."""

from __future__ import annotations

from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.jobs.progress import Log, no_log
from surepoint.repo.gc import MARGIN_SECONDS, GcResult, collect_garbage
from surepoint.repo.repository import Repository


def run_gc(
    repository: Repository,
    events: EventRecorder,
    *,
    dry_run: bool = False,
    margin: float = MARGIN_SECONDS,
    log: Log = no_log,
) -> GcResult:
    """Remove unreferenced chunks and indexes older than `margin` seconds (count them if `dry_run`)."""
    result = collect_garbage(repository, dry_run=dry_run, margin=margin, log=log)
    if not dry_run:
        events.record(Component.GC, Phase.SWEEP, Outcome.OK, f"removed {result.removed_chunks} chunks")
    return result
