"""`surepoint copy`: a backup copy job from one repository to another (off-site, other keys, other media).

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

from dataclasses import asdict
from typing import Annotated

import typer

from surepoint.cli.common import (
    FROM_PASSPHRASE,
    Context,
    JsonOption,
    err,
    human,
    open_other_repository,
    out,
    parse_since,
    parse_size,
    print_json,
    source_passphrase,
)
from surepoint.errors import UsageError


def register(app: typer.Typer) -> None:
    """Add `copy` to the main app."""

    @app.command("copy")
    def copy(
        ctx: typer.Context,
        names: Annotated[list[str] | None, typer.Argument(help="Only restore points of these names.")] = None,
        source: Annotated[str, typer.Option("--from", help="Source repository (path, ssh://..., s3://...).")] = "",
        target: Annotated[
            str | None, typer.Option("--to", help="Target repository (default: --repo / SUREPOINT_REPO).")
        ] = None,
        since: Annotated[
            str | None, typer.Option(help="Only restore points created at or after this date (YYYY-MM-DD[THH:MM]).")
        ] = None,
        bandwidth: Annotated[
            str | None, typer.Option(help="Limit what is written to the target, bytes per second (50M, 1G).")
        ] = None,
        workers: Annotated[
            int | None, typer.Option(help="Chunks copied at once (default: 4, or 16 with S3).", min=1, max=64)
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Copy the restore points the target repository lacks from the source (--from), sending only missing chunks.

        Passphrases: the source's from SUREPOINT_FROM_PASSPHRASE(_FILE), the target's as usual.
        An interrupted copy leaves no partial restore point: run it again to send the rest.
        """
        from surepoint.jobs.copy import CopyOptions, copy_restore_points
        from surepoint.progress import byte_progress

        c: Context = ctx.obj
        if not source:
            raise UsageError("name the source repository with --from REPO")
        target = target or c.repo_location
        if not target:
            raise UsageError("name the target repository with --to REPO (or --repo / SUREPOINT_REPO)")
        rate = parse_size(bandwidth) if bandwidth else None
        if rate == 0:
            raise UsageError("--bandwidth must be more than 0")
        options = CopyOptions(
            names=tuple(names or ()),
            since=parse_since(since) if since else None,
            bandwidth=rate,
            workers=workers,
        )
        source_repo = open_other_repository(
            source, lambda: source_passphrase(source), "source", f"{FROM_PASSPHRASE}(_FILE)"
        )
        try:
            target_repo = open_other_repository(
                target, c.passphrase, "target", "SUREPOINT_PASSPHRASE or --passphrase-file"
            )
            try:
                with _Bar(err, byte_progress) as bar:
                    result = copy_restore_points(
                        source_repo,
                        target_repo,
                        c.catalog(),
                        options,
                        log=lambda m: err.print(f"  {m}"),
                        progress=bar.advance,
                        on_plan=bar.start,
                    )
            finally:
                target_repo.backend.close()
        finally:
            source_repo.backend.close()
        if as_json:
            data = asdict(result)
            data.update(sent_bytes=result.sent_bytes, sent_chunks=result.sent_chunks)
            print_json(data)
            return
        out.print(
            f"copied {len(result.copied)} restore point(s) from {result.source} to {result.target}: "
            f"{result.sent_chunks} chunks sent ({human(result.sent_bytes)}); "
            f"{result.already_present} already on the target"
        )
        for p in result.copied:
            out.print(
                f"  {p.id} {p.name} ({p.created[:19].replace('T', ' ')}, {p.consistency}): {p.sent_chunks} of "
                f"{p.chunks} chunks sent, {p.present_chunks} already there, {p.seconds:.1f} s"
            )
        for s in result.skipped:
            out.print(f"  {s.id} {s.name}: not copied, {s.reason}")
        if result.logs:
            out.print(f"  {len(result.logs)} shipped transaction-log files ({human(result.log_bytes)})")


class _Bar:
    """A progress bar opened once the plan knows how many bytes the copy covers."""

    def __init__(self, console, factory) -> None:
        self.console, self.factory = console, factory
        self._cm = None
        self._advance = None

    def start(self, total: int) -> None:
        self._cm = self.factory(self.console, "copy", total)
        self._advance = self._cm.__enter__()

    def advance(self, n: int) -> None:
        if self._advance:
            self._advance(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
