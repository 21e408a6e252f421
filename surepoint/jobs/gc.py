"""Garbage collection as a job: sweep what no restore point refers to, and record it."""

from __future__ import annotations

from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake
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
    result = GcResult(dry_run=dry_run)

    def state() -> str:
        if dry_run:
            return "gc --dry-run removed nothing"
        return (
            f"gc removed {result.removed_chunks} unreferenced chunk(s) before it stopped; nothing in use was "
            "removed (a chunk parked in trash/ goes back or away at the next gc)"
        )

    def record(message: str) -> None:
        events.record(Component.GC, Phase.SWEEP, Outcome.FAILED, message)

    with at_stake(state, record):
        collect_garbage(repository, dry_run=dry_run, margin=margin, log=log, result=result)
    if not dry_run:
        events.record(Component.GC, Phase.SWEEP, Outcome.OK, f"removed {result.removed_chunks} chunks")
    return result
