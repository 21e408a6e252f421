"""explore postgresql: a throw-away PostgreSQL of the cluster's major version on an overlay of its data directory.

It runs as the data directory's owner, listens on a private unix socket only, trusts local
connections through its own pg_hba.conf (no password of the source is needed), archives nothing,
and runs every query in a read-only transaction. Tables export as CSV (COPY ... TO STDOUT), or,
like whole databases, as pg_dump custom-format archives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from surepoint.consistency.restore import find_in_point
from surepoint.consistency.restore_postgresql import cluster_major, pg_bin
from surepoint.consistency.runner import one_line
from surepoint.jobs.explore_base import (
    ExploreError,
    ExportSink,
    Overlay,
    TableInfo,
    owner_ids,
    quote_ident,
    split_item,
    stop_process,
    wait_until_ready,
)

PORT = 5432  # unix socket only, in a private directory: the number only names the socket file


class PostgresExplorer:
    table_formats = ("csv", "custom")
    database_formats = ("custom",)

    def __init__(self, roots: list[str], metadata: dict) -> None:
        self.source = find_in_point(roots, metadata.get("data_directory", ""), "PG_VERSION")
        self.major = cluster_major(self.source)
        if not os.path.exists(pg_bin(self.major, "postgres")):
            raise ExploreError(
                f"the restore point holds a PostgreSQL {self.major} cluster and PostgreSQL {self.major} is not "
                f"installed here ({pg_bin(self.major, 'postgres')} is missing)"
            )
        self.title = f"PostgreSQL {self.major}"
        self.uid, self.gid = owner_ids(self.source)
        self.owner = {"user": self.uid, "group": self.gid, "extra_groups": []}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PostgresExplorer:
        self.overlay = Overlay(self.source, self.uid, self.gid).__enter__()
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, signal.SIGQUIT)  # immediate shutdown: nothing of this server is kept
        self.overlay.__exit__()

    def _start(self) -> None:
        data, scratch = self.overlay.path, self.overlay.scratch
        # The pid file names the source's postmaster; removing it whites it out in the upper layer only.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(data, "postmaster.pid"))
        hba = os.path.join(scratch, "pg_hba.conf")
        with open(hba, "w") as f:
            f.write("local all all trust\n")
        os.chown(hba, self.uid, self.gid)
        self.socket_dir = scratch
        log = os.path.join(scratch, "postgres.log")
        argv = [
            pg_bin(self.major, "postgres"), "-D", data, "-c", "listen_addresses=", "-c", f"port={PORT}",
            "-c", f"unix_socket_directories={scratch}", "-c", "archive_mode=off", "-c", f"hba_file={hba}",
            "-c", "logging_collector=off", "-c", "shared_preload_libraries=", "-c", "max_connections=10",
            "-c", "fsync=off",
        ]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, **self.owner
            )
        isready = [pg_bin(self.major, "pg_isready"), "-q", "-h", scratch, "-p", str(PORT)]
        wait_until_ready(self.title, self.proc, lambda: subprocess.run(isready).returncode == 0, log)
        # The bootstrap superuser is named after initdb's user (-U), usually the data directory's owner.
        tried = []
        for candidate in dict.fromkeys([_user_name(self.uid), "postgres"]):
            self.user = candidate
            try:
                self.user = self.psql("postgres", "SELECT rolname FROM pg_roles WHERE oid = 10")[0][0]
                return
            except ExploreError as exc:
                tried.append(str(exc))
        raise ExploreError(f"cannot connect to the throw-away {self.title}: {tried[-1]}")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": self.socket_dir, "PGPORT": str(PORT), "PGUSER": self.user,
                "PGCONNECT_TIMEOUT": "10", "PGOPTIONS": "-c default_transaction_read_only=on"}  # fmt: skip

    def psql(self, database: str, sql: str) -> list[list[str]]:
        argv = [pg_bin(self.major, "psql"), "-X", "-w", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                "-d", database, "-c", sql]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=300, **self.owner)
        if result.returncode != 0:
            raise ExploreError(one_line(result.stderr) or f"psql exited with {result.returncode}")
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def databases(self) -> list[str]:
        return [r[0] for r in self.psql("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]

    def list_tables(self) -> list[TableInfo]:
        tables = []
        for db in self.databases():
            rows = self.psql(
                db,
                "SELECT n.nspname || '.' || c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
            )
            tables += [TableInfo(db, name, int(count), int(size)) for name, count, size in rows]
        return tables

    def export(self, item: str, tmp: str, *, where: str | None, fmt: str, sink: ExportSink) -> None:
        database, schema, table = split_item(item)
        if database not in self.databases():
            raise ExploreError(f"database {database!r} is not in the restore point")
        if table is not None:
            schema = self._schema_of(database, schema, table, item)
        if fmt == "csv":
            select = f"SELECT * FROM {quote_ident(schema)}.{quote_ident(table)}" + (f" WHERE {where}" if where else "")
            argv = [pg_bin(self.major, "psql"), "-X", "-w", "-v", "ON_ERROR_STOP=1", "-d", database,
                    "-c", f"COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER)"]  # fmt: skip
            sink.stream(argv, tmp, env=self.env(), owner=self.owner, csv_lines=True)
            return
        if where:
            raise ExploreError("--where works with --format csv only")
        argv = [pg_bin(self.major, "pg_dump"), "-w", "-Fc", "-d", database]
        if table is not None:
            argv += ["-t", f"{quote_ident(schema)}.{quote_ident(table)}"]
        sink.stream(argv, tmp, env=self.env(), owner=self.owner, csv_lines=False)

    def _schema_of(self, database: str, schema: str | None, table: str, item: str) -> str:
        condition = f"n.nspname = {_literal(schema)}" if schema else "n.nspname = ANY (current_schemas(false))"
        found = self.psql(
            database,
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            f" WHERE c.relname = {_literal(table)} AND {condition} AND c.relkind IN ('r', 'p', 'v', 'm')",
        )
        if not found:
            raise ExploreError(f"table {item.split('.', 1)[1]!r} is not in database {database!r} of the restore point")
        return found[0][0]


def _literal(text: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings: only quotes are doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "postgres"
