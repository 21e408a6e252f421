"""The `surepoint` command line: the Typer app, its global options, and `main()`.

Each command group lives in its own module with a `register(app)` function, listed below in the
order of the help; shared plumbing (consoles, options, `Context`, the passphrase reader, JSON and
size helpers, `with_hints`) is in `common`. A command parses, calls one function of
`surepoint.jobs` (or of the layer under it) and renders. `main()` is the only place where errors
become exit codes, and where the advice for them (`hint`) is printed.
"""

from __future__ import annotations

import sys

import typer

from surepoint.cli import (
    app_restore,
    backup,
    copy,
    events,
    failover,
    find,
    instant,
    lab,
    mount,
    points,
    replica,
    repository,
    restore,
    retention,
    scan,
    serve,
    server,
    verify,
    vm,
    writers,
)
from surepoint.cli.common import CatalogOption, Context, PassFileOption, RepoOption, err, say_error
from surepoint.errors import (
    RepositoryLocked,
    RepositoryNotFound,
    RestorePointNotFound,
    SurepointError,
    UnreadableRestorePoints,
)
from surepoint.interrupt import Interrupted, handle_signals, report
from surepoint.memory import keep_chunk_buffers

app = typer.Typer(
    help="Image-level backup of disks and virtual machines into a deduplicating, verifiable repository.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    repo: RepoOption = None,
    passphrase_file: PassFileOption = None,
    catalog: CatalogOption = None,
    server_url: server.ServerOption = None,
) -> None:
    ctx.obj = Context(repo, passphrase_file, catalog)
    ctx.obj.server_url = server_url


for module in (
    repository,
    backup,
    points,
    restore,
    verify,
    retention,
    vm,
    writers,
    events,
    mount,
    copy,
    serve,
    app_restore,
    instant,
    lab,
    replica,
    scan,
    failover,
    server,
    find,
):
    module.register(app)


# What to do next, by error class: the core names the problem, the command line gives the advice.
HINTS: dict[type[SurepointError], str] = {
    RepositoryNotFound: "check --repo, or create one with `surepoint init`",
    RestorePointNotFound: "see `surepoint list`",
    RepositoryLocked: "wait for it to finish, or run `surepoint unlock` if that process is gone",
    UnreadableRestorePoints: "run `surepoint verify`, then forget or repair those restore points",
}


def error_with_hint(exc: SurepointError) -> str:
    """The error's message and the advice for it, on one line (the error line is the last on stderr)."""
    hint = exc.hint or next((h for cls, h in HINTS.items() if isinstance(exc, cls)), None)
    return f"{exc}; {hint}" if hint else str(exc)


def main() -> None:
    """Entry point: run the app and turn errors a user can cause into one line (and a hint) and an exit code."""
    handle_signals()
    keep_chunk_buffers()
    try:
        app()
    except Interrupted as exc:
        # one line: what the interruption leaves behind (locks and partial files are gone by now)
        say_error(report(exc))
        sys.exit(exc.exit_code)
    except SurepointError as exc:
        # soft_wrap (in common.err): one line, never wrapped; no markup: messages hold paths and guest text
        say_error(error_with_hint(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(0)
