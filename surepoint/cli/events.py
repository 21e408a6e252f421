"""`surepoint events`: what the catalog recorded (job phases, writer phases, pruning, verification)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import Context, JsonOption, out, print_json, short_time


def events(
    ctx: typer.Context,
    restore_point: Annotated[str | None, typer.Argument(help="Only events of this restore point.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    as_json: JsonOption = False,
) -> None:
    """Show recorded events (job phases, writer phases, pruning, verification)."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point_id = repo.resolve(restore_point).id if restore_point else None
    rows = c.catalog().events(repo.id, point_id, limit)
    if as_json:
        print_json([asdict(e) for e in rows])
        return
    table = Table()
    for col in ("time (UTC)", "restore point", "source", "component", "phase", "outcome", "message"):
        table.add_column(col)
    for e in rows:
        table.add_row(
            short_time(e.time), e.restore_point or "", e.source or "", e.component, e.phase, e.outcome, e.message
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(events)
