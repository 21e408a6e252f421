"""`surepoint verify`: re-read stored chunks, report damage, then prune logs that waited for it."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.text import Text

from surepoint.cli.common import EXIT_DAMAGE, Context, JsonOption, err, out, parse_since, print_json
from surepoint.errors import UsageError
from surepoint.jobs.after_verify import prune_after_verify
from surepoint.jobs.verify import repair_and_record, verify_and_record
from surepoint.progress import count_progress
from surepoint.text import printable


def verify(
    ctx: typer.Context,
    restore_point: Annotated[str | None, typer.Argument(help="Only this restore point (default: all).")] = None,
    sample: Annotated[
        float | None,
        typer.Option(help="Check only this percentage of chunks, chosen at random.", min=0.01, max=100),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Skip chunks already verified at or after this date (YYYY-MM-DD[THH:MM])."),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Quarantine damaged chunks (the next backup stores them again), fetch them from --from, "
            "mark points healed or damaged.",
        ),
    ] = False,
    other: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="With --repair: a copy of this repository to fetch damaged chunks from "
            "(passphrase in SUREPOINT_FROM_PASSPHRASE(_FILE)).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-read and check stored chunks; report damaged restore points and byte ranges (exit 3 on damage).

    With --repair: exit 0 when every restore point is whole afterwards, 3 when some stay damaged or
    are lost."""
    c: Context = ctx.obj
    if other and not repair:
        raise UsageError("--from is for --repair: name the copy to fetch damaged chunks from")
    if repair and (sample or since):
        raise UsageError("--repair checks every chunk: it cannot be combined with --sample or --since")
    repo = c.open_repository()
    points = [repo.resolve(restore_point)] if restore_point else repo.list_restore_points()
    if repair:
        _repair(c, repo, points, other, as_json)
        return
    since_iso = parse_since(since) if since else None
    with count_progress(err, "verify chunks") as (set_total, advance):
        report = verify_and_record(
            repo,
            points,
            c.catalog(),
            sample=(sample / 100) if sample else None,
            since=since_iso,
            progress=advance,
            on_plan=set_total,
        )
    if as_json:
        print_json(report.to_dict())
    else:
        out.print(
            f"checked {report.checked_chunks} chunks ({report.skipped_chunks} skipped as recently verified), "
            f"{report.damaged_chunks} damaged"
        )
        for p in report.points:
            colour = {"verified": "green", "damaged": "red"}.get(p.state, "yellow")
            out.print(Text.assemble(f"  {p.id} {printable(p.name)}: ", (p.state, colour)))
            for r in p.damaged:
                out.print(f"    disk {r.disk} bytes {r.offset}-{r.offset + r.length - 1}: {r.reason}")
        for m in report.damaged_manifests:
            out.print(Text.assemble("  ", ("damaged manifest", "red"), f" {printable(m)}"))
        for point_id in report.forgotten:
            out.print(f"  {point_id}: removed by a concurrent forget before it was checked (not damage)")
    intact = {r.id for r in report.points if r.state == "verified"}
    prune_after_verify(
        repo,
        c.catalog(),
        [p for p in points if p.id in intact],
        inventory=os.environ.get("SUREPOINT_VM_INVENTORY"),
        log=(lambda _m: None) if as_json else out.print,
    )
    if report.damaged:
        raise typer.Exit(EXIT_DAMAGE)


def _repair(c: Context, repo, points, other_location: str | None, as_json: bool) -> None:
    from surepoint.cli.common import open_other_repository, source_passphrase

    other = None
    if other_location:
        other = open_other_repository(
            other_location, lambda: source_passphrase(other_location), "copy", "SUREPOINT_FROM_PASSPHRASE"
        )
    try:
        with count_progress(err, "verify chunks") as (set_total, advance):
            report = repair_and_record(
                repo,
                points,
                c.catalog(),
                other=other,
                progress=advance,
                on_plan=set_total,
                log=(lambda _m: None) if as_json else (lambda m: err.print(f"  {m}")),
            )
    finally:
        if other is not None:
            other.backend.close()
    if as_json:
        print_json(report.to_dict())
    else:
        out.print(
            f"repair: {report.healed_chunks} chunk(s) healed"
            + (f" from {printable(report.other)}" if report.other else "")
            + f", {report.quarantined_chunks} quarantined (waiting for the next backup), {report.lost_chunks} lost"
        )
        colours = {"verified": "green", "healed": "green", "damaged": "red"}
        for p in report.points:
            out.print(Text.assemble(f"  {p.id} {printable(p.name)}: ", (p.state, colours.get(p.state, "yellow"))))
            for label, ranges in (("lost", p.lost), ("damaged", p.damaged)):
                for r in ranges:
                    out.print(f"    {label}: disk {r.disk} bytes {r.offset}-{r.offset + r.length - 1}: {r.reason}")
        for m in report.damaged_manifests:
            out.print(Text.assemble("  ", ("damaged manifest", "red"), f" {printable(m)}"))
    if not report.whole:
        raise typer.Exit(EXIT_DAMAGE)


def register(app: typer.Typer) -> None:
    app.command()(verify)
