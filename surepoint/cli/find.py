"""`surepoint index` and `surepoint find`: the file index of restore points, searched without mounting.

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

from datetime import UTC, datetime
from typing import Annotated

import typer

from surepoint.cli.common import Context, JsonOption, err, out, print_json, with_hints
from surepoint.errors import NeedsRoot, UsageError
from surepoint.text import printable


def _when(ns: int | None) -> str:
    if ns is None:
        return ""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""

    @app.command("index")
    @with_hints({NeedsRoot: "run as root (the changed filesystems are mounted to list their files)"})
    def index_command(
        ctx: typer.Context,
        restore_points: Annotated[
            list[str] | None, typer.Argument(help="Id, id prefix, or NAME:latest (default: every point not indexed).")
        ] = None,
        name: Annotated[str | None, typer.Option(help="Only the restore points of this name (VM).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Record the file list of every filesystem of restore points in the catalog, for `surepoint find`.

        Filesystems whose bytes did not change since an indexed restore point reuse its list
        without being read; the others are mounted read-only and walked.
        """
        from surepoint.catalog import FileIndexCatalog
        from surepoint.jobs.file_index import index_point

        c: Context = ctx.obj
        repo = c.open_repository()
        catalog = c.catalog()
        if restore_points:
            points = [repo.resolve(ref) for ref in restore_points]
        else:
            indexed = FileIndexCatalog(catalog).indexed_points(repo.id)
            points = [p for p in repo.list_restore_points() if p.id not in indexed]
        if name is not None:
            points = [p for p in points if p.name == name]
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {printable(m)}"))
        results = []
        for point in sorted(points, key=lambda p: p.created):
            result = index_point(repo, catalog, point, log=say)
            results.append(result.to_json())
            if not as_json:
                listed = sum(1 for v in result.volumes if not v["reused"])
                out.print(
                    f"indexed {point.id} ({printable(point.name)}): {len(result.volumes)} filesystem(s), "
                    f"{listed} listed, {len(result.volumes) - listed} unchanged, {result.seconds:.1f} s"
                )
                for note in result.notes:
                    err.print(f"  {printable(note)}")
        if as_json:
            print_json({"indexed": results})
        elif not points:
            out.print("nothing to index")

    @app.command("find")
    def find_command(
        ctx: typer.Context,
        pattern: Annotated[
            str,
            typer.Argument(help="A name (`*.conf`) or a guest path (`/etc/nginx/*`); * ? [..] as in a shell."),
        ],
        name: Annotated[str | None, typer.Option(help="Only the restore points of this name (VM).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Which restore points hold a file, and when it was created, changed or deleted (no mount).

        Searches the file index (`surepoint index`, `vm backup --index`). A pattern without "/"
        matches file names; with "/", whole guest paths (`*` also matches "/"). Exit 1 when
        nothing matches (as grep).
        """
        from surepoint.jobs.file_index import find

        if not pattern or "\0" in pattern:
            raise UsageError("give a pattern")
        c: Context = ctx.obj
        repo = c.open_repository()
        found, indexed = find(repo, c.catalog(), pattern, name)
        if as_json:
            print_json({"paths": [f.to_json() for f in found], "indexed_points": indexed})
            if not found:
                raise typer.Exit(1)
            return
        if not indexed:
            err.print("no restore point is indexed yet (see `surepoint index`)")
            raise typer.Exit(1)
        for entry in found:
            out.print(f"{printable(entry.name)}: {printable(entry.path)}", soft_wrap=True)
            for v in entry.versions:
                detail = ""
                if v.change != "deleted":
                    kind = {"d": "directory", "l": "symlink", "o": "special"}.get(v.type or "", f"{v.size} bytes")
                    detail = f"  {kind}, modified {_when(v.mtime_ns)}"
                out.print(f"  {v.created}  {v.restore_point}  {v.change}{detail}", soft_wrap=True)
        if indexed and not found:
            err.print(f"no indexed restore point holds {printable(pattern)}")
            raise typer.Exit(1)
