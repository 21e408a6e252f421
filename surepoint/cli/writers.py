"""`surepoint writers`: what application-aware processing finds on this host or in a job file."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import JsonOption, out, print_json
from surepoint.consistency.detect import detect_host_applications, identify_configured
from surepoint.consistency.runner import HostRunner
from surepoint.jobs.job_file import load_job

writers_app = typer.Typer(help="Application-aware processing: what writers find.", no_args_is_help=True)


@writers_app.command("detect")
def writers_detect(
    job: Annotated[str | None, typer.Option("--job", help="Check the writers of this job file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the applications found on this host (or those a job file configures) and what they store where."""
    runner = HostRunner()
    found = identify_configured(load_job(job).writers, runner) if job else detect_host_applications(runner)
    if as_json:
        print_json(found)
        return
    table = Table(title="writers" + (f" of {job}" if job else " found on this host"))
    for col in ("writer", "status", "components"):
        table.add_column(col)
    for item in found:
        comps = "\n".join(f"{c['kind']} {c['name']}: {', '.join(c['paths'])}" for c in item["components"])
        table.add_row(item["writer"], item["status"], comps or item.get("message", ""))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(writers_app, name="writers")
