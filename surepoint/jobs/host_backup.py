"""An application-aware backup of image files on this host: writers, reflink snapshot, backup, log handling."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from surepoint.catalog import Catalog
from surepoint.consistency.logs import handle_logs
from surepoint.consistency.quiesce import QuiesceOutcome, Quiescer
from surepoint.consistency.registry import build_writers
from surepoint.consistency.runner import CommandRunner, HostRunner
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.fsmap.source import free_space_summary, skip_free_space
from surepoint.host_snapshot import remove_snapshots, snapshot_files
from surepoint.jobs.job_file import JobConfig
from surepoint.jobs.vm_backup import VmJobOptions, backup_vm
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.sources import FileDiskSource
from surepoint.vm.inventory import find_vm


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
    events: EventRecorder | None = None,
    log: Callable[[str], None] | None = None,
    skip_free: bool = True,
) -> JobResult:
    runner = runner or HostRunner()
    rp_id = repository.new_restore_point_id()
    say = log or (lambda _m: None)
    event = replace(
        (events or EventRecorder(catalog, repository.id)).bound(restore_point=rp_id, source=job.name), echo=say
    )

    event(
        Component.JOB, Phase.START, Outcome.OK, f"backup of {job.name}: {len(job.sources)} source(s), logs={job.logs}"
    )
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
        event(
            Component.JOB,
            Phase.SNAPSHOT,
            Outcome.OK,
            f"consistency {outcome.level}, frozen {outcome.freeze_seconds:.3f} s",
        )
        paths = clones or job.sources
        sources = [
            FileDiskSource(path, name=os.path.basename(orig)) for path, orig in zip(paths, job.sources, strict=True)
        ]
        try:
            free_space: dict[int, dict] = {}
            if skip_free:
                sources, free_space = skip_free_space(sources, log=say)
                event(Component.JOB, Phase.PLAN, Outcome.OK, free_space_summary(free_space))
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
                disk_metadata=free_space,
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
        event(Component.JOB, Phase.FINISH, Outcome.FAILED, str(exc) or type(exc).__name__)
        raise
    remove_snapshots(clones)
    event(
        Component.JOB, Phase.COMMIT, Outcome.OK, f"restore point {point.id} committed ({point.consistency}-consistent)"
    )
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
    event(
        Component.JOB,
        Phase.FINISH,
        Outcome.OK if not outcome.failures else Outcome.WARNING,
        "; ".join(outcome.failures),
    )
    return JobResult(point, outcome)


def run_job(
    repository: Repository,
    catalog: Catalog,
    job: JobConfig,
    *,
    inventory: str | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
    events: EventRecorder | None = None,
    log: Callable[[str], None] | None = None,
    skip_free: bool = True,
) -> JobResult:
    """Run a job file's backup: of its VM (found in `inventory` or among running QEMU processes)
    or of image files on this host."""
    if job.vm:
        options = VmJobOptions(
            fallback=job.fallback,
            freeze_timeout=job.freeze_timeout,
            writers=job.writers,
            logs=job.logs,
            skip_free=skip_free,
            fstrim=job.fstrim,
        )
        result = backup_vm(repository, catalog, find_vm(job.vm, inventory), options, events=events, log=log)
        return JobResult(result.restore_point, result.outcome)
    return run_host_job(
        repository, catalog, job, progress_factory=progress_factory, events=events, log=log, skip_free=skip_free
    )
