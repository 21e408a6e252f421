"""Retention commands: `forget` (by policy) and `gc` (remove what nothing refers to)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import Context, JsonOption, err, human, out, print_json, short_time
from surepoint.errors import RepositoryLocked, UsageError
from surepoint.events import EventRecorder
from surepoint.jobs.gc import run_gc
from surepoint.jobs.retention import forget_by_policy
from surepoint.repo.gc import MARGIN_SECONDS
from surepoint.repo.repository import Repository
from surepoint.repo.retention import Policy


def forget(
    ctx: typer.Context,
    keep_last: Annotated[int, typer.Option(min=0)] = 0,
    keep_hourly: Annotated[int, typer.Option(min=0)] = 0,
    keep_daily: Annotated[int, typer.Option(min=0)] = 0,
    keep_weekly: Annotated[int, typer.Option(min=0)] = 0,
    keep_monthly: Annotated[int, typer.Option(min=0)] = 0,
    keep_yearly: Annotated[int, typer.Option(min=0)] = 0,
    name: Annotated[str | None, typer.Option(help="Only restore points of this name.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be forgotten.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Run garbage collection afterwards.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Forget restore points by a retention policy (per name); data goes at the next `gc`."""
    c: Context = ctx.obj
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.is_empty():
        raise UsageError("give at least one --keep-* rule (forgetting everything is not an option)")
    repo = c.open_repository()
    result = forget_by_policy(repo, EventRecorder(c.catalog(), repo.id), policy, name=name, dry_run=dry_run)
    if not dry_run:  # a forgotten point waits for no log prune: its saved credentials go too
        gone = [d.id for d in result.decisions if not d.keep and not d.locked_until and not d.held_by]
        c.catalog().drop_pending_prunes(repo.id, gone)
    if as_json:
        print_json(result.to_json())
    else:
        table = Table(title="retention" + (" (dry run: nothing forgotten)" if dry_run else ""))
        for col in ("id", "name", "created (UTC)", "action", "reasons"):
            table.add_column(col)
        for d in result.decisions:
            action = "keep" if d.keep else ("would forget" if dry_run else "forgotten")
            if d.locked_until:
                action = f"locked until {short_time(d.locked_until)}: forget it after that"
            if d.held_by:
                action = "kept: being read"
            table.add_row(d.id, d.name, short_time(d.created), action, ", ".join(d.reasons))
        out.print(table)
    if prune and not dry_run:
        _gc(c, repo, dry_run=False, as_json=False)
    if result.held:
        raise RepositoryLocked(
            "not forgotten, being read: " + "; ".join(f"{d.id} ({d.name}) by {d.held_by}" for d in result.held),
            hint="run forget again once the reader has finished; the other restore points were forgotten",
        )


def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    grace: Annotated[
        float, typer.Option(help="Keep unreferenced data younger than this many seconds (clock-skew margin).", min=0)
    ] = MARGIN_SECONDS,
    as_json: JsonOption = False,
) -> None:
    """Remove chunks and indexes that no restore point refers to (safe while backups run)."""
    c: Context = ctx.obj
    _gc(c, c.open_repository(), dry_run=dry_run, as_json=as_json, grace=grace)


def _gc(c: Context, repo: Repository, *, dry_run: bool, as_json: bool, grace: float = MARGIN_SECONDS) -> None:
    result = run_gc(repo, EventRecorder(c.catalog(), repo.id), dry_run=dry_run, margin=grace, log=err.print)
    if as_json:
        print_json(asdict(result))
        return
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {result.removed_chunks} chunks ({human(result.removed_bytes)}), {result.removed_indexes} "
        f"orphaned indexes, {result.removed_temporary} temporary files; {result.referenced_chunks} chunks in use, "
        f"{result.kept_recent_chunks} recent unreferenced chunks kept for running or recent backups"
    )
    if result.trashed_chunks:
        out.print(
            f"{result.trashed_chunks} chunks ({human(result.trashed_bytes)}) moved to trash: "
            "the next gc deletes them (this storage cannot rename atomically)"
        )
    if result.locked_objects:
        when = datetime.fromtimestamp(result.locked_until or 0, UTC).strftime("%Y-%m-%d %H:%M UTC")
        out.print(
            f"{result.locked_objects} unreferenced objects are locked until {when} at the latest: "
            "kept; a gc after that removes them"
        )


def register(app: typer.Typer) -> None:
    app.command()(forget)
    app.command()(gc)
