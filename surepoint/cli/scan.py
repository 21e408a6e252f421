"""`surepoint scan`: YARA rules over a restore point's files, and the walk back to a clean point."""

from __future__ import annotations

from typing import Annotated

import typer

from surepoint.cli.common import Context, JsonOption, err, log_line, out, print_json, quiet, say_warning, with_hints
from surepoint.errors import NeedsRoot, UsageError
from surepoint.text import printable

EXIT_MATCH = 5  # a rule matched (scan), or no restore point is clean (--find-clean)
EXIT_INCOMPLETE = 1  # no match, but some files could not be read: the point is not shown clean


def scan(
    ctx: typer.Context,
    restore_point: Annotated[
        str | None, typer.Argument(help="Id, id prefix, or NAME:latest (not with --find-clean).")
    ] = None,
    yara_rules: Annotated[
        str | None, typer.Option("--yara", metavar="RULES", help="YARA rules file to run over every file.")
    ] = None,
    find_clean: Annotated[
        str | None,
        typer.Option(
            "--find-clean",
            metavar="NAME",
            help="Walk back from the newest restore point of NAME to the newest with no signal and no match.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Scan restore points for malware.

    `scan POINT --yara RULES` mounts the point read-only and runs the rules over the files of every
    filesystem; matches are listed with their paths in the guest, and the result is kept in the
    catalog. Exit 0: clean; 5: a rule matched; 1: no match but some files could not be read; 2:
    bad arguments or rules.

    `scan --find-clean NAME [--yara RULES]` prints the newest restore point of NAME that is not
    "suspicious" (see `list`) and has no YARA match: scanned with RULES when given, else by its
    last recorded scan. Exit 5 when no point is clean.
    """
    from surepoint.jobs.scan import find_clean as search_clean
    from surepoint.jobs.scan import scan_point
    from surepoint.scan.yara_scan import load_rules

    if (restore_point is None) == (find_clean is None):
        raise UsageError("give either a restore point to scan or --find-clean NAME")
    if restore_point is not None and yara_rules is None:
        raise UsageError("scanning a restore point needs --yara RULES")
    rules = load_rules(yara_rules) if yara_rules else None
    c: Context = ctx.obj
    repo = c.open_repository()
    catalog = c.catalog()
    log = quiet if as_json else log_line

    if find_clean is not None:
        search = search_clean(repo, find_clean, rules, catalog, log=log)
        if as_json:
            print_json(search.to_json())
        elif search.clean is not None:
            out.print(search.clean.id, soft_wrap=True)
            err.print(f"  newest clean restore point of {printable(find_clean)}: {search.clean.created}")
        if search.clean is None:
            if not as_json:
                say_warning(f"no restore point of {printable(find_clean)} is clean")
            raise typer.Exit(EXIT_MATCH)
        return

    point = repo.resolve(restore_point)  # type: ignore[arg-type]

    def show_match(found) -> None:
        if not as_json:
            out.print(f"MATCH {printable(found.path)}: {', '.join(printable(r) for r in found.rules)}", soft_wrap=True)

    result = scan_point(repo, point, rules, catalog, log=log, on_match=show_match)  # type: ignore[arg-type]
    report = result.report
    if as_json:
        print_json(result.to_json())
    else:
        for path, error in report.errors[:50]:
            say_warning(f"not scanned: {printable(path)}: {printable(error)}")
        for path, why in report.skipped[:50]:
            say_warning(f"skipped: {printable(path)}: {why}")
        for v in result.not_scanned:
            say_warning(f"disk {v['disk']} {v['volume']} not scanned: {printable(v['reason'])}")
        err.print(
            f"  {report.files} files ({report.bytes} bytes) scanned in {len(result.volumes)} filesystems: "
            f"{len(report.matches)} match, {len(report.errors)} unreadable, {len(report.skipped)} skipped"
        )
        out.print(f"{point.id}: {report.outcome}", soft_wrap=True)
    if report.outcome == "match":
        raise typer.Exit(EXIT_MATCH)
    if report.outcome == "incomplete":
        raise typer.Exit(EXIT_INCOMPLETE)


def register(app: typer.Typer) -> None:
    hints = {NeedsRoot: "run as root (scanning mounts the restore point's filesystems)"}
    app.command()(with_hints(hints)(scan))
