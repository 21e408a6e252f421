"""explore mariadb: a throw-away mariadbd on an overlay of the data directory.

It runs as the data directory's owner with --skip-grant-tables (no password of the source is
needed) and --skip-networking: only root on this host reaches its private socket. InnoDB crash
recovery runs on the overlay with the binary logs of the point (they settle prepared
transactions, as in restore-app). Tables export as CSV, or, like whole databases, as SQL
(mariadb-dump, which also takes --where).
"""

from __future__ import annotations

import os
import signal
import subprocess

from surepoint.consistency.restore import find_in_point, which
from surepoint.consistency.restore_mariadb import binlog_options
from surepoint.consistency.runner import one_line
from surepoint.jobs.explore_base import (
    ExploreError,
    ExportSink,
    Overlay,
    TableInfo,
    owner_ids,
    quote_ident,
    split_item,
    sql_literal,
    stop_process,
    wait_until_ready,
)

SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


class MariaDBExplorer:
    table_formats = ("csv", "sql")
    database_formats = ("sql",)

    def __init__(self, roots: list[str], metadata: dict) -> None:
        self.metadata = metadata
        self.source = find_in_point(roots, metadata.get("datadir", ""), "mysql")
        self.mariadbd = which("mariadbd", "/usr/sbin/mariadbd")
        self.title = f"MariaDB {metadata.get('version', '')}".strip()
        self.uid, self.gid = owner_ids(self.source)
        self.owner = {"user": self.uid, "group": self.gid, "extra_groups": []}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MariaDBExplorer:
        self.overlay = Overlay(self.source, self.uid, self.gid).__enter__()
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, signal.SIGKILL)  # nothing of this server is kept: no shutdown needed
        self.overlay.__exit__()

    def _start(self) -> None:
        data, scratch = self.overlay.path, self.overlay.scratch
        for name in os.listdir(data):
            if name.endswith(".pid"):
                os.unlink(os.path.join(data, name))
        self.socket = os.path.join(scratch, "mysqld.sock")
        log = os.path.join(scratch, "mariadbd.err")
        argv = [
            self.mariadbd, "--no-defaults", f"--datadir={data}", f"--socket={self.socket}", "--skip-networking",
            "--skip-grant-tables", f"--pid-file={os.path.join(scratch, 'mariadbd.pid')}", f"--log-error={log}",
            "--innodb-buffer-pool-size=32M", "--skip-slave-start", "--innodb-flush-log-at-trx-commit=0",
            *binlog_options(self.metadata, data),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, **self.owner,
        )  # fmt: skip
        ping = ["mariadb-admin", f"--socket={self.socket}", "--connect-timeout=2", "ping"]
        wait_until_ready(self.title, self.proc, lambda: subprocess.run(ping, capture_output=True).returncode == 0, log)

    def _client(self, *args: str) -> list[str]:
        return ["mariadb", f"--socket={self.socket}", "--connect-timeout=10", *args]

    def sql(self, sql: str) -> list[list[str]]:
        result = subprocess.run(
            self._client("--batch", "--skip-column-names", "-e", sql), capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise ExploreError(one_line(result.stderr) or f"mariadb exited with {result.returncode}")
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def list_tables(self) -> list[TableInfo]:
        excluded = ", ".join(sql_literal(s) for s in SYSTEM_SCHEMAS)
        rows = self.sql(
            "SELECT table_schema, table_name, coalesce(table_rows, -1), coalesce(data_length + index_length, 0)"
            f" FROM information_schema.tables WHERE table_schema NOT IN ({excluded}) AND table_type = 'BASE TABLE'"
            " ORDER BY 1, 2"
        )
        return [TableInfo(db, name, int(count), int(size)) for db, name, count, size in rows]

    def export(self, item: str, tmp: str, *, where: str | None, fmt: str, sink: ExportSink) -> None:
        database, schema, table = split_item(item)
        if schema is not None:
            raise ExploreError("MariaDB has no schemas inside a database: give DB.TABLE")
        if not self.sql(f"SELECT 1 FROM information_schema.schemata WHERE schema_name = {sql_literal(database)}"):
            raise ExploreError(f"database {database!r} is not in the restore point")
        if table is not None and not self.sql(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = "
            f"{sql_literal(database)} AND table_name = {sql_literal(table)}"
        ):
            raise ExploreError(f"table {table!r} is not in database {database!r} of the restore point")
        if fmt == "sql":
            argv = ["mariadb-dump", f"--socket={self.socket}", "--single-transaction", database]
            if table is not None:
                argv.append(table)
            if where:
                argv.append(f"--where={where}")
            sink.stream(argv, tmp, env=dict(os.environ), owner={}, csv_lines=False)
            return
        select = f"SELECT * FROM {quote_ident(database, '`')}.{quote_ident(table, '`')}"
        if where:
            select += f" WHERE {where}"
        argv = self._client("--batch", "--quick", "-e", f"SET SESSION TRANSACTION READ ONLY; {select}")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            lines = (line.decode(errors="replace").rstrip("\n") for line in proc.stdout)
            header = next(lines, None)
            if header is not None:
                sink.write_csv(header.split("\t"), ([_unescape(v) for v in line.split("\t")] for line in lines), tmp)
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode != 0 or header is None:
            raise ExploreError(f"export failed: {one_line(err) or 'no output'}")


def _unescape(value: str) -> str | None:
    """A value as `mariadb --batch` prints it: NULL, and \\t \\n \\\\ \\0 escaped."""
    if value == "NULL":
        return None
    if "\\" not in value:
        return value
    out, chars = [], iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append({"t": "\t", "n": "\n", "0": "\0", "\\": "\\"}.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)
