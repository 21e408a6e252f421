"""`surepoint restore`: one disk of a restore point to a file or block device."""

from __future__ import annotations

import os
import stat
from typing import Annotated

import typer

from surepoint.cli.common import Context, err, human, out
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake
from surepoint.progress import byte_progress
from surepoint.repo.restore import restore_disk


def restore(
    ctx: typer.Context,
    restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest.")],
    to: Annotated[str, typer.Option("--to", help="Target file or block device.")],
    disk: Annotated[int, typer.Option(help="Disk number within the restore point.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing target file.")] = False,
) -> None:
    """Restore one disk of a restore point to a file or block device."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    size = next((d.size for d in point.disks if d.number == disk), 0)
    events = EventRecorder(c.catalog(), repo.id)
    if is_block_device(to):
        stake = f"target {to} is half written: restore it again before using it"
    else:
        stake = f"nothing was written to {to} (the partial file is removed)"

    def record(message: str) -> None:
        events.record(Component.RESTORE, Phase.DATA, Outcome.FAILED, message, restore_point=point.id)

    with at_stake(stake, record), byte_progress(err, f"restore {point.id} disk {disk}", size) as advance:
        result = restore_disk(repo, point, disk, to, overwrite=overwrite, progress=advance)
    events.record(Component.RESTORE, Phase.DATA, Outcome.OK, f"disk {disk} restored to {to}", restore_point=point.id)
    out.print(
        f"restored disk {disk} of {point.id} ({human(result.size)}) to {result.target}; "
        f"{human(result.sparse_bytes)} left sparse"
    )


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def register(app: typer.Typer) -> None:
    app.command()(restore)
