"""Back up image files or block devices of this host as one restore point (no writers, no snapshot)."""

from __future__ import annotations

import os

from surepoint.errors import InvalidArgument
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.fsmap.source import free_space_summary, skip_free_space
from surepoint.jobs.progress import Log, ProgressFactory, no_log
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.sources import DiskSource, FileDiskSource


def backup_files(
    repository: Repository,
    events: EventRecorder,
    paths: list[str],
    *,
    name: str | None = None,
    full: bool = False,
    skip_free: bool = True,
    progress: ProgressFactory | None = None,
    log: Log = no_log,
) -> RestorePoint:
    """One restore point of `paths` named `name` (default: the first file's name), incremental
    against the latest point of that name unless `full`; blocks the disks' filesystems mark free
    are stored as zeros without being read unless not `skip_free`."""
    sources: list[DiskSource] = []
    try:
        for path in paths:
            sources.append(FileDiskSource(path))
        absolute = [os.path.abspath(p) for p in paths]
        latest = repository.latest_named(name or sources[0].name)
        if name is None:
            name = sources[0].name
            _check_same_sources(name, absolute, latest)
        base = None if full else latest
        free_space: dict[int, dict] = {}
        if skip_free:
            sources, free_space = skip_free_space(sources, log=log)
        request = BackupRequest(
            name=name,
            sources=sources,
            source_info={"kind": "files", "paths": absolute},
            disk_metadata=free_space,
            base=base,
            restore_point_id=repository.new_restore_point_id(),
        )
        job_events = events.bound(restore_point=request.restore_point_id, source=name)
        job_events.record(Component.JOB, Phase.START, Outcome.OK, f"backup of {name}")
        if free_space:
            job_events.record(Component.JOB, Phase.PLAN, Outcome.OK, free_space_summary(free_space))
        advance = progress(sum(s.size for s in sources)) if progress else None
        try:
            point = run_backup(repository, request, progress=advance, log=log)
        except BaseException as exc:  # an interruption too: the job says it ended without a point
            job_events.record(Component.JOB, Phase.FINISH, Outcome.FAILED, str(exc) or type(exc).__name__)
            raise
    finally:
        for source in sources:
            source.close()
    job_events.record(Component.JOB, Phase.COMMIT, Outcome.OK, f"restore point {point.id} committed")
    return point


def _check_same_sources(name: str, paths: list[str], latest: RestorePoint | None) -> None:
    """A name derived from a file name must not join the chain of other files that had the same name.

    Without it, /a/web01/disk.img and /b/db01/disk.img would be one chain: the second diffed
    against the first, and retention counting both as one machine's restore points."""
    if latest is None:
        return
    before = latest.source.get("paths") if isinstance(latest.source, dict) else None
    if before and before != paths:
        raise InvalidArgument(
            f"restore points named {name!r} are of {', '.join(before)}, not {', '.join(paths)}",
            hint=f"give this source a name of its own with --name, or --name {name} to continue that chain",
        )
