"""Restore-point commands: `list` and `show`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import (
    EXIT_DAMAGE,
    Context,
    JsonOption,
    human,
    out,
    point_json,
    print_json,
    say_error,
    say_warning,
    short_time,
)
from surepoint.scan.signals import suspicious_points


def list_points(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="Only restore points of this name.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List restore points, oldest first."""
    c: Context = ctx.obj
    repo = c.open_repository()
    catalog = c.catalog()
    points = [p for p in repo.list_restore_points() if name is None or p.name == name]
    suspicious = suspicious_points(points)

    def verification(p) -> dict[str, str]:
        return catalog.verification_summary(repo.id, p.id, bootable=p.bootable)

    if as_json:
        print_json(
            {
                "repository": repo.id,
                "restore_points": [
                    {**point_json(p, verification(p)), "suspicious": suspicious.get(p.id)} for p in points
                ],
                "damaged_manifests": repo.damaged_manifests,
            }
        )
        _damaged_exit(repo.damaged_manifests)
        return
    table = Table(title=f"restore points in {repo.backend.location}")
    for col in ("id", "name", "created (UTC)", "disks", "size", "consistency", "state", "new data", "signals"):
        table.add_column(col)
    for p in points:
        table.add_row(
            p.id,
            p.name,
            short_time(p.created),
            str(len(p.disks)),
            human(p.size),
            p.consistency,
            verification(p)["state"],
            human(sum(d.stored_bytes for d in p.disks)),
            "suspicious" if p.id in suspicious else "",
        )
    out.print(table)
    for p in points:
        if p.id in suspicious:
            say_warning(f"restore point {p.id} is suspicious: {suspicious[p.id]}")
    for m in repo.damaged_manifests:
        say_error(f"damaged manifest {m}: run `surepoint verify`")
    _damaged_exit(repo.damaged_manifests)


def _damaged_exit(damaged: list[str]) -> None:
    """`list` shows the good restore points and still exits 3 when a manifest is damaged."""
    if damaged:
        sys.exit(EXIT_DAMAGE)


def show(ctx: typer.Context, restore_point: str, as_json: JsonOption = False) -> None:
    """Show one restore point in full."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    data = point_json(point, c.catalog().verification_summary(repo.id, point.id, bootable=point.bootable))
    data["suspicious"] = suspicious_points(p for p in repo.list_restore_points() if p.name == point.name).get(point.id)
    if as_json:
        print_json(data)
    else:
        out.print_json(json.dumps(data))


def register(app: typer.Typer) -> None:
    app.command("list")(list_points)
    app.command()(show)
