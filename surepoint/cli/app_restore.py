"""`surepoint restore-app` (an application out of a restore point, in its own order, to a point in time) and
`surepoint logs` (ship transaction logs between image backups, list them).

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

from datetime import UTC, datetime
from typing import Annotated

import typer

from surepoint.cli.common import Context, JsonOption, err, out, print_json
from surepoint.errors import UsageError


def parse_time(text: str) -> datetime:
    """'2026-12-01 10:15:00' (this host's time zone), with fractions of a second or an offset (+00:00, Z)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{text!r} is not a time like '2026-12-01 10:15:00' or '2026-12-01T10:15:00.5+00:00'"
        ) from None
    return (value if value.tzinfo else value.astimezone()).astimezone(UTC)


def register(app: typer.Typer) -> None:
    """Add `restore-app` and the `logs` group to the main app."""

    @app.command("restore-app")
    def restore_app(
        ctx: typer.Context,
        writer: Annotated[str, typer.Argument(help="postgresql, mariadb or sqlite.")],
        restore_point: Annotated[
            str, typer.Argument(help="A name (its latest point, or the last before --at), or an id.")
        ],
        to: Annotated[
            str | None,
            typer.Option(
                "--to",
                help="Data directory (SQLite: database file or directory) to restore into; with --vm, a path in "
                "the guest (default: where it was at the backup).",
            ),
        ] = None,
        at: Annotated[
            str | None,
            typer.Option("--at", help="Point in time: replay shipped logs up to it ('2026-12-01 10:15:00')."),
        ] = None,
        port: Annotated[int | None, typer.Option(help="Port the restored server listens on.")] = None,
        socket: Annotated[
            str | None,
            typer.Option(help="Socket directory (PostgreSQL) or socket file (MariaDB) of the restored server."),
        ] = None,
        os_user: Annotated[
            str | None, typer.Option(help="Run the restored server as this user (default: the files' owner).")
        ] = None,
        start: Annotated[
            bool, typer.Option("--start/--no-start", help="Start the restored server and check it.")
        ] = True,
        archive: Annotated[
            bool, typer.Option("--archive/--no-archive", help="PostgreSQL: keep the restored cluster's WAL archiving.")
        ] = True,
        replica_of: Annotated[
            str | None,
            typer.Option(
                "--replica-of",
                help="Come back as a replica of this primary and catch up: PostgreSQL a conninfo string, MariaDB "
                "'host=H port=P user=U password_file=F' (GTID replication).",
            ),
        ] = None,
        overwrite: Annotated[
            bool, typer.Option(help="Replace data at --to (the old contents are moved aside, never deleted).")
        ] = False,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to start and recover.")] = 300,
        vm: Annotated[
            str | None,
            typer.Option("--vm", help="Restore inside this running VM, through its guest agent (its own service)."),
        ] = None,
        service: Annotated[
            str | None,
            typer.Option(help="With --vm: the application's systemd unit in the guest (default: found)."),
        ] = None,
        inventory: Annotated[
            str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (with --vm).")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Restore one application from a restore point: pre-restore, restore, post-restore, each recorded.

        PostgreSQL: the cluster on --to is stopped, the data directory comes back, a stale
        postmaster.pid goes, the server starts (recovering from its WAL), promotes to a new timeline
        (its old replicas are listed to be re-synced) and must answer; with --replica-of it comes back
        as a standby of that primary instead and catches up. MariaDB:
        the same with InnoDB crash recovery, and the binary log position of the snapshot recorded.
        SQLite: the database file without the -wal/-shm of the file it replaces. With --at, the last
        restore point before that time is taken and the logs shipped with `surepoint logs ship` are
        replayed up to it. With --vm the same happens inside a running VM: its service is stopped, the
        data copied in through a hot-plugged port (or the guest agent), the service started and checked.
        """
        from surepoint.consistency.restore import TargetInUse
        from surepoint.jobs.app_restore import AppRestoreOptions, PointInTimeError, restore_application

        if not to and not vm:
            raise UsageError("give --to DIRECTORY (or --vm NAME to restore inside a running VM)")
        if service and not vm:
            raise UsageError("--service is for a restore inside a VM (--vm NAME)")
        c: Context = ctx.obj
        repo = c.open_repository()
        options = AppRestoreOptions(
            writer=writer,
            ref=restore_point,
            target=to or "",
            vm=vm,
            service=service,
            inventory=inventory,
            at=parse_time(at) if at else None,
            port=port,
            socket=socket,
            os_user=os_user,
            start=start,
            archive=archive,
            replica_of=replica_of,
            overwrite=overwrite,
            timeout=timeout,
        )
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        try:
            result = restore_application(repo, c.catalog(), options, say=say)
        except PointInTimeError as exc:
            raise UsageError(f"{exc} (see `surepoint logs list {writer} NAME` and `surepoint list`)") from None
        except TargetInUse as exc:
            if "allow overwriting" in str(exc):
                raise TargetInUse(f"{exc} (--overwrite)") from None
            raise
        if as_json:
            print_json(result.to_json())
            return
        out.print(
            f"restored {writer} from {result.point.id} ({result.point.name}) to "
            + (f"VM {vm}: " if vm else "")
            + result.target
            + (f" as of {options.at.isoformat()}, {len(result.logs)} log file(s) replayed" if options.at else "")
            + f" in {result.seconds:.1f} s"
        )

    logs_app = typer.Typer(help="Transaction logs between image backups: ship them into the repository, list them.")
    app.add_typer(logs_app, name="logs")

    @logs_app.command("ship")
    def logs_ship(
        ctx: typer.Context,
        job: Annotated[
            str, typer.Option("--job", help="The job file of the database (its writers say where logs are).")
        ],
        inventory: Annotated[
            str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (a VM job).")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Store closed PostgreSQL WAL and MariaDB binary logs in the repository, then remove them on the server.

        Run it every few minutes between image backups (cron, a timer): `restore-app --at` replays
        what it shipped. For a VM job (vm = NAME) the logs are read inside the VM through its guest
        agent and removed there once stored.
        """
        from surepoint.jobs.job_file import load_job
        from surepoint.jobs.log_shipping import ship_logs

        c: Context = ctx.obj
        repo = c.open_repository()
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        reports = ship_logs(repo, c.catalog(), load_job(job), inventory=inventory, say=say)
        if as_json:
            print_json([r.to_json() for r in reports])
            return
        for r in reports:
            out.print(
                f"{r.writer}: shipped {len(r.shipped)}, already stored {len(r.already)}, "
                f"removed on the server {len(r.removed_on_server)}, forgotten {len(r.forgotten)}"
            )

    @logs_app.command("archive-wal")
    def logs_archive_wal(
        ctx: typer.Context,
        path: Annotated[str, typer.Argument(help="%p: the WAL file's path.")],
        file: Annotated[str, typer.Argument(help="%f: the WAL file's name.")],
        name: Annotated[str, typer.Option("--name", help="The restore-point name the logs extend (the job's name).")],
    ) -> None:
        """For archive_command: store one WAL file in the repository (exit 0 only once it is durable).

        archive_command = 'surepoint --repo R --passphrase-file F logs archive-wal --name db01 %p %f'
        (the PostgreSQL server's user needs access to the repository and the passphrase).
        """
        from surepoint.jobs.log_shipping import archive_wal

        c: Context = ctx.obj
        out.print(f"{file}: {archive_wal(c.open_repository(), c.catalog(), name, path, file)}")

    @logs_app.command("list")
    def logs_list(
        ctx: typer.Context,
        writer: Annotated[str, typer.Argument(help="postgresql or mariadb.")],
        name: Annotated[str, typer.Argument(help="The restore-point name the logs extend.")],
        as_json: JsonOption = False,
    ) -> None:
        """List the log files shipped for one name."""
        from rich.table import Table

        from surepoint.repo.logstore import LogStore

        c: Context = ctx.obj
        records = LogStore(c.open_repository()).list(name, writer)
        if as_json:
            print_json([{k: v for k, v in r.__dict__.items() if k not in ("chunks", "object")} for r in records])
            return
        table = Table(title=f"{writer} logs of {name}")
        for col in ("file", "size", "shipped (UTC)", "covers until (UTC)"):
            table.add_column(col)
        for r in records:
            table.add_row(r.file, str(r.size), r.shipped[:23].replace("T", " "), r.covers_until[:23].replace("T", " "))
        out.print(table)

    @app.command("explore")
    def explore(
        ctx: typer.Context,
        writer: Annotated[str, typer.Argument(help="postgresql, mariadb or sqlite.")],
        restore_point: Annotated[str, typer.Argument(help="Id, id prefix, NAME or NAME:latest.")],
        list_items: Annotated[bool, typer.Option("--list", help="List the databases and tables.")] = False,
        export: Annotated[
            str | None, typer.Option("--export", help="DB, DB.TABLE or (PostgreSQL) DB.SCHEMA.TABLE.")
        ] = None,
        where: Annotated[str | None, typer.Option("--where", help="Only the rows matching this SQL condition.")] = None,
        to: Annotated[str | None, typer.Option("--to", help="File to write the export to.")] = None,
        fmt: Annotated[
            str | None,
            typer.Option(
                "--format",
                help="A table: csv (default) or custom (PostgreSQL pg_dump) / sql (MariaDB). A database: custom "
                "(PostgreSQL), sql (MariaDB), sqlite (SQLite).",
            ),
        ] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing --to file.")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Pull databases, tables or rows out of a restore point without restoring it.

        A throw-away server of the application starts on a writable overlay of the point's data
        directory, read through a read-only mount of the restore point (never written), and is
        removed afterwards. The time to the first exported row is reported.
        """
        import os
        import time

        from rich.table import Table

        from surepoint.jobs.explore import ExportResult, open_explorer, record
        from surepoint.jobs.explore import export as export_item

        started = time.monotonic()
        if list_items == bool(export):
            raise UsageError("give --list, or --export ITEM --to FILE")
        if export and not to:
            raise UsageError("--export needs --to FILE")
        if to and os.path.exists(to) and not overwrite:
            raise UsageError(f"{to} exists: pass --overwrite to replace it")
        c: Context = ctx.obj
        repo = c.open_repository()
        point = repo.latest_named(restore_point) or repo.resolve(restore_point)
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        with open_explorer(writer, repo, point, say) as explorer:
            ready = time.monotonic() - started
            if list_items:
                tables = explorer.list_tables()
                if as_json:
                    print_json([t.__dict__ for t in tables])
                    return
                table = Table(title=f"restore point {point.id} ({point.name}): {explorer.title}")
                for col in ("database", "table", "rows", "size"):
                    table.add_column(col)
                for t in tables:
                    table.add_row(t.database, t.table, str(t.rows) if t.rows >= 0 else "?", str(t.bytes))
                out.print(table)
                return
            result = ExportResult(point, export, os.path.abspath(to), fmt or "", timings={"server_ready": ready})
            try:
                export_item(explorer, export, to, where=where, fmt=fmt, started=started, result=result)
            except Exception as exc:
                record(c.catalog(), repo, point, "failed", f"{export}: {exc}")
                raise
        result.seconds = time.monotonic() - started
        record(
            c.catalog(), repo, point, "ok", f"{export} to {result.target}: {result.rows} rows in {result.seconds:.1f} s"
        )
        if as_json:
            print_json(result.to_json())
            return
        first = f", first row after {result.first_row_seconds:.1f} s" if result.first_row_seconds is not None else ""
        out.print(
            f"exported {export} from {point.id} to {result.target} ({result.format}): "
            + (f"{result.rows} rows" if result.format == "csv" else f"{result.bytes} bytes")
            + f"{first}, {result.seconds:.1f} s in all"
        )
