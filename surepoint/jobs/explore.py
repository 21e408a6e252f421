"""Item-level recovery: one database, table or set of rows out of a restore point, without restoring it.

The restore point is mounted read-only (surepoint/mount: chunks are read on demand), the data
directory found there becomes the lower layer of an overlay whose upper layer is a private
temporary directory, and a throw-away PostgreSQL of the cluster's major version starts on the
overlay: its crash recovery writes only to the upper layer, the restore point is never written.
It listens on a private unix socket only, answers read-only transactions, and is stopped and
removed with the overlay when the command ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from surepoint.catalog import Catalog
from surepoint.consistency.restore import find_in_point, owner_of
from surepoint.consistency.restore_postgresql import cluster_major, pg_bin
from surepoint.consistency.runner import one_line
from surepoint.errors import SurepointError, UsageError
from surepoint.events import EventRecorder
from surepoint.jobs.app_restore import mounted_point, writer_metadata
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository

START_TIMEOUT = 300.0


class ExploreError(SurepointError):
    """The throw-away server could not start, or the item asked for is not there."""


@dataclass
class TableInfo:
    database: str
    table: str  # schema.table
    rows: int  # the planner's estimate (pg_class.reltuples), -1 when never analysed
    bytes: int


@dataclass
class ExportResult:
    point: RestorePoint
    item: str
    target: str
    format: str
    rows: int = 0
    bytes: int = 0
    first_row_seconds: float | None = None  # from the start of the command
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "restore_point": self.point.id,
            "item": self.item,
            "target": self.target,
            "format": self.format,
            "rows": self.rows,
            "bytes": self.bytes,
            "first_row_seconds": None if self.first_row_seconds is None else round(self.first_row_seconds, 3),
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def split_item(item: str) -> tuple[str, str | None, str | None]:
    """DB, DB.TABLE or DB.SCHEMA.TABLE -> (database, schema, table)."""
    parts = item.split(".")
    if not all(parts) or len(parts) > 3:
        raise UsageError(f"{item!r} is not DB, DB.TABLE or DB.SCHEMA.TABLE")
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ThrowawayPostgres:
    """A PostgreSQL server on a writable overlay of a read-only data directory."""

    def __init__(self, data_dir: str) -> None:
        self.lower = data_dir
        self.major = cluster_major(data_dir)
        if not os.path.exists(pg_bin(self.major, "postgres")):
            raise ExploreError(
                f"the restore point holds a PostgreSQL {self.major} cluster and PostgreSQL {self.major} is not "
                f"installed here ({pg_bin(self.major, 'postgres')} is missing)"
            )
        self.user, self.uid, self.gid = owner_of(data_dir)
        self.proc: subprocess.Popen | None = None

    def _as_owner(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def __enter__(self) -> ThrowawayPostgres:
        self.dir = tempfile.mkdtemp(prefix="surepoint-explore-")
        os.chmod(self.dir, 0o711)  # the server's user passes through to its own private directories
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        upper, work, self.data = (os.path.join(self.dir, d) for d in ("upper", "work", "data"))
        self.socket_dir = os.path.join(self.dir, "socket")
        for d in (upper, work, self.data, self.socket_dir):
            os.mkdir(d, 0o700)
            os.chown(d, self.uid, self.gid)
        options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        mounted = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, self.data], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            raise ExploreError(f"cannot make a writable overlay of {self.lower}: {one_line(mounted.stderr)}")
        self.mounted = True
        # The pid file names the source's postmaster; removing it here only whites it out in the upper layer.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.data, "postmaster.pid"))
        self.log = os.path.join(self.dir, "postgres.log")
        # Only this host's root reaches the private socket: trust it, whatever the source cluster required.
        hba = os.path.join(self.dir, "pg_hba.conf")
        with open(hba, "w") as f:
            f.write("local all all trust\n")
        os.chown(hba, self.uid, self.gid)
        self.port = 5432
        argv = [
            pg_bin(self.major, "postgres"), "-D", self.data, "-c", "listen_addresses=", "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.socket_dir}", "-c", "archive_mode=off", "-c", f"hba_file={hba}",
            "-c", "logging_collector=off",
            "-c", "shared_preload_libraries=", "-c", "max_connections=10", "-c", "fsync=off",
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, **self._as_owner()
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready = subprocess.run(
                [pg_bin(self.major, "pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise ExploreError(f"the throw-away PostgreSQL exited: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise ExploreError(f"the throw-away PostgreSQL did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        except OSError:
            return ""
        fatal = [line for line in lines if "FATAL" in line or "PANIC" in line]
        return one_line((fatal or lines or ["(no log)"])[-1])[-300:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate: nothing of this server is kept
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        mounted = getattr(self, "mounted", False)
        if mounted and subprocess.run(["umount", self.data], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", self.data], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PGHOST": self.socket_dir,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGCONNECT_TIMEOUT": "10",
            "PGOPTIONS": "-c default_transaction_read_only=on",
        }

    def psql(self, database: str, sql: str) -> list[list[str]]:
        argv = [pg_bin(self.major, "psql"), "-X", "-w", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                "-d", database, "-c", sql]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=300, **self._as_owner())
        if result.returncode != 0:
            raise ExploreError(one_line(result.stderr) or f"psql exited with {result.returncode}")
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def databases(self) -> list[str]:
        rows = self.psql("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
        return [r[0] for r in rows]


def _data_dir(point: RestorePoint, roots: list[str]) -> str:
    meta = writer_metadata(point, "postgresql")
    return find_in_point(roots, meta.get("data_directory", ""), "PG_VERSION")


@contextlib.contextmanager
def explore_postgres(repository: Repository, point: RestorePoint, say: Callable[[str], None]) -> Iterator:
    writer_metadata(point, "postgresql")
    with mounted_point(repository, point, say) as roots, ThrowawayPostgres(_data_dir(point, roots)) as server:
        yield server


def list_tables(server: ThrowawayPostgres) -> list[TableInfo]:
    tables = []
    for db in server.databases():
        rows = server.psql(
            db,
            "SELECT n.nspname || '.' || c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
        )
        tables += [TableInfo(db, name, int(rows_), int(size)) for name, rows_, size in rows]
    return tables


def export_item(
    server: ThrowawayPostgres,
    item: str,
    target: str,
    *,
    where: str | None,
    fmt: str,
    started: float,
    result: ExportResult,
) -> None:
    """Export DB (pg_dump custom format) or DB[.SCHEMA].TABLE (CSV with a header, or pg_dump custom)."""
    database, schema, table = split_item(item)
    if database not in server.databases():
        raise ExploreError(f"database {database!r} is not in the restore point")
    if table is None and where:
        raise UsageError("--where needs a table: DB.TABLE")
    if table is not None:
        found = server.psql(
            database,
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = "
            + _literal(table)
            + (f" AND n.nspname = {_literal(schema)}" if schema else " AND n.nspname = ANY (current_schemas(false))")
            + " AND c.relkind IN ('r', 'p', 'v', 'm')",
        )
        if not found:
            raise ExploreError(f"table {item.split('.', 1)[1]!r} is not in database {database!r} of the restore point")
        schema = found[0][0]
    tmp = f"{target}.surepoint-partial"
    if fmt == "csv" and table is not None:
        select = f"SELECT * FROM {quote_ident(schema)}.{quote_ident(table)}" + (f" WHERE {where}" if where else "")
        argv = [pg_bin(server.major, "psql"), "-X", "-w", "-v", "ON_ERROR_STOP=1", "-d", database,
                "-c", f"COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER)"]  # fmt: skip
        _stream(argv, server, tmp, started, result, rows=True)
    else:
        if where:
            raise UsageError("--where works with --format csv only")
        argv = [pg_bin(server.major, "pg_dump"), "-w", "-Fc", "-d", database]
        if table is not None:
            argv += ["-t", f"{quote_ident(schema)}.{quote_ident(table)}"]
        _stream(argv, server, tmp, started, result, rows=False)
    os.replace(tmp, target)


def _stream(
    argv: list[str], server: ThrowawayPostgres, tmp: str, started: float, result: ExportResult, *, rows: bool
) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server.env(), **server._as_owner()
            ) as proc,
        ):
            lines = 0
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                out.write(chunk)
                result.bytes += len(chunk)
                if rows:
                    lines += chunk.count(b"\n")
                if result.first_row_seconds is None and (lines >= 2 or not rows):
                    result.first_row_seconds = time.monotonic() - started
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode != 0:
            raise ExploreError(f"export failed: {one_line(err)}")
        # CSV: a header line, then one line per row (quoted newlines inside values are rare in exports)
        result.rows = max(lines - 1, 0) if rows else 0
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def record(catalog: Catalog, repository: Repository, point: RestorePoint, outcome: str, message: str) -> None:
    with contextlib.suppress(Exception):
        EventRecorder(catalog, repository.id, point.id, point.name)("explore", "export", outcome, message)
