"""`surepoint backup`: image files, block devices or a job file as one restore point.

`backup vm NAME...` is kept as another spelling of `vm backup NAME...`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Annotated

import typer

from surepoint.cli import vm as vm_commands
from surepoint.cli.common import (
    UNVERIFIED,
    Context,
    InventoryOption,
    JsonOption,
    SkipFreeOption,
    err,
    human,
    log_line,
    out,
    point_json,
    print_json,
    say_warning,
)
from surepoint.errors import UsageError
from surepoint.events import EventRecorder
from surepoint.interrupt import at_stake
from surepoint.jobs.file_backup import backup_files
from surepoint.jobs.host_backup import run_job
from surepoint.jobs.job_file import load_job
from surepoint.progress import byte_progress
from surepoint.repo.manifest import RestorePoint

# What an interrupted backup leaves (the jobs record the event): the restore point is committed
# last, so there is none, and the chunks stored so far are found and reused by the next backup.
BACKUP_STAKE = "no restore point was written; chunks already stored are reused by the next backup"


def backup(
    ctx: typer.Context,
    sources: Annotated[
        list[str] | None, typer.Argument(help="Disk image files or block devices (one restore point).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the backed-up system; links incrementals.")] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="Job file (TOML) with sources, writers and log policy.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Ignore the previous restore point.")] = False,
    parallel: Annotated[int, typer.Option(help="VMs backed up at once (backup vm ...).", min=1)] = 2,
    inventory: InventoryOption = None,
    fallback: Annotated[str, typer.Option(help="try: fall back to crash consistency; require: fail.")] = "try",
    quiesce: Annotated[bool, typer.Option(help="Freeze guest filesystems through the guest agent.")] = True,
    freeze_timeout: Annotated[float, typer.Option(help="Seconds the guest may stay frozen.", min=1)] = 20.0,
    skip_free: SkipFreeOption = True,
    fstrim: Annotated[
        bool, typer.Option("--fstrim", help="backup vm: ask the guest to trim first (disks with discard=unmap).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Back up disk images or block devices as one restore point (application-aware with --job).

    `surepoint backup vm NAME...` is `surepoint vm backup NAME...`: running QEMU VMs, found by
    name from their QEMU processes or --inventory, several in parallel.
    """
    c: Context = ctx.obj
    if sources and sources[0] == "vm":
        vm_commands.backup_and_report(
            c,
            sources[1:],
            parallel,
            inventory,
            fallback,
            quiesce,
            full,
            as_json,
            freeze_timeout,
            skip_free,
            fstrim=fstrim,
        )
        return
    if bool(job) == bool(sources):
        raise UsageError("give either SOURCE... or --job FILE")
    config = load_job(job) if job else None
    repo = c.open_repository()
    catalog = c.catalog()
    # The bar can only be drawn once the job knows the size; it closes with the job.
    with at_stake(BACKUP_STAKE), contextlib.ExitStack() as bars:

        def progress(label: str) -> Callable[[int], Callable[[int], None]]:
            return lambda total: bars.enter_context(byte_progress(err, f"backup {label}", total))

        if config:
            result = run_job(
                repo,
                catalog,
                config,
                inventory=inventory,
                progress_factory=progress(config.name),
                log=log_line,
                skip_free=skip_free,
            )
            if result.outcome.failures:
                say_warning(
                    f"{result.restore_point.consistency}-consistent only: " + "; ".join(result.outcome.failures)
                )
            point = result.restore_point
        else:
            paths = sources or []
            point = backup_files(
                repo,
                EventRecorder(catalog, repo.id),
                paths,
                name=name,
                full=full,
                skip_free=skip_free,
                progress=progress(name or os.path.basename(paths[0].rstrip("/"))),
                log=log_line,
            )
    _report(point, as_json)


def _report(point: RestorePoint, as_json: bool) -> None:
    if as_json:
        print_json(point_json(point, UNVERIFIED))
        return
    new = sum(d.new_bytes for d in point.disks)
    stored = sum(d.stored_bytes for d in point.disks)
    read = sum(d.read_bytes for d in point.disks)
    out.print(
        f"restore point {point.id} of {point.name}: {human(point.size)} disk, read {human(read)}, "
        f"new data {human(new)} stored as {human(stored)}, {point.consistency}-consistent, "
        f"{point.duration_seconds:.1f} s"
    )


def register(app: typer.Typer) -> None:
    app.command()(backup)
