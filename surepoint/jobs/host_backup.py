"""An application-aware backup of image files on this host: writers, reflink snapshot, backup, log handling."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from surepoint.catalog import Catalog
from surepoint.consistency.logs import handle_logs
from surepoint.consistency.quiesce import QuiesceOutcome, Quiescer
from surepoint.consistency.registry import build_writers
from surepoint.consistency.runner import CommandRunner, HostRunner
from surepoint.host_snapshot import remove_snapshots, snapshot_files
from surepoint.jobs.config import JobConfig
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.sources import FileDiskSource


@dataclass
class JobResult:
    restore_point: RestorePoint
    outcome: QuiesceOutcome


def run_host_job(
    repository: Repository,
    catalog: Catalog,
    job: JobConfig,
    *,
    runner: CommandRunner | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    runner = runner or HostRunner()
    rp_id = repository.new_restore_point_id()
    say = log or (lambda _m: None)

    def event(component: str, phase: str, outcome: str, message: str = "") -> None:
        catalog.add_event(repository.id, component, phase, outcome, message, restore_point=rp_id, source=job.name)
        if outcome not in ("ok",):
            say(f"{component} {phase}: {outcome} {message}".rstrip())

    event("job", "start", "ok", f"backup of {job.name}: {len(job.sources)} source(s), logs={job.logs}")
    configs = job.writers
    writers = build_writers(configs, runner)
    quiescer = Quiescer(writers, fallback=job.fallback, freeze_timeout=job.freeze_timeout, events=event)
    clones: list[str] = []
    try:
        quiescer.prepare()
        if job.snapshot == "reflink":
            clones, outcome = quiescer.snapshot(lambda: snapshot_files(job.sources))
        else:
            _, outcome = quiescer.snapshot(lambda: None)
            if writers:
                say("snapshot = none: the image is read after thaw, so it is crash-consistent at best")
                outcome.level = "crash"
        event("job", "snapshot", "ok", f"consistency {outcome.level}, frozen {outcome.freeze_seconds:.3f} s")
        paths = clones or job.sources
        sources = [
            FileDiskSource(path, name=os.path.basename(orig)) for path, orig in zip(paths, job.sources, strict=True)
        ]
        try:
            request = BackupRequest(
                name=job.name,
                sources=sources,
                source_info={"kind": "files", "paths": [os.path.abspath(p) for p in job.sources]},
                consistency=outcome.level,
                metadata={
                    "writers": outcome.writer_metadata,
                    "log_mode": job.logs,
                    "consistency_failures": outcome.failures,
                    "freeze_seconds": round(outcome.freeze_seconds, 3),
                },
                base=repository.latest_named(job.name),
                restore_point_id=rp_id,
            )
            total = sum(s.size for s in sources)
            progress = progress_factory(total) if progress_factory else None
            point = run_backup(repository, request, progress=progress, log=say)
        finally:
            for s in sources:
                s.close()
    except BaseException as exc:
        remove_snapshots(clones)
        quiescer.abort()
        event("job", "finish", "failed", str(exc) or type(exc).__name__)
        raise
    remove_snapshots(clones)
    event("job", "commit", "ok", f"restore point {point.id} committed ({point.consistency}-consistent)")
    quiescer.complete(point.id)
    handle_logs(
        job.logs,
        list(zip(configs, writers, strict=True)),
        outcome.writer_metadata,
        catalog=catalog,
        repository_id=repository.id,
        restore_point_id=point.id,
        source=job.name,
        events=event,
    )
    event("job", "finish", "ok" if not outcome.failures else "warning", "; ".join(outcome.failures))
    return JobResult(point, outcome)
