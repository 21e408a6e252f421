"""explore sqlite: the point's databases opened on an overlay of their directory.

Opening a database in WAL mode writes its -shm (and applies the -wal of the snapshot): on the
overlay those writes land in the upper layer, never in the restore point. A database is named by
its file name without extension (`/srv/app/app.db` is `app`). Tables export as CSV; a whole
database as a standalone SQLite file (VACUUM INTO).
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict

from surepoint.consistency.restore import find_in_point
from surepoint.jobs.explore_base import ExploreError, ExportSink, Overlay, TableInfo, owner_ids, quote_ident, split_item


class SqliteExplorer:
    title = f"SQLite {sqlite3.sqlite_version}"
    table_formats = ("csv",)
    database_formats = ("sqlite",)

    def __init__(self, roots: list[str], metadata: dict) -> None:
        databases = metadata.get("databases") or []
        if not databases:
            raise ExploreError("the restore point lists no SQLite database")
        self.found = {}  # name -> path in the mounted point
        for db in databases:
            name = os.path.splitext(os.path.basename(db))[0]
            if name in self.found:
                raise ExploreError(
                    f"two databases are named {name!r} (by their file name): explore cannot tell them apart"
                )
            self.found[name] = find_in_point(roots, db, "")

    def __enter__(self) -> SqliteExplorer:
        by_dir = defaultdict(list)
        for name, path in self.found.items():
            by_dir[os.path.dirname(path)].append(name)
        self.overlays = []
        self.paths = {}
        try:
            for directory, names in by_dir.items():
                overlay = Overlay(directory, *owner_ids(directory)).__enter__()
                self.overlays.append(overlay)
                for name in names:
                    self.paths[name] = os.path.join(overlay.path, os.path.basename(self.found[name]))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for overlay in self.overlays:
            overlay.__exit__()

    def _open(self, name: str) -> sqlite3.Connection:
        if name not in self.paths:
            raise ExploreError(
                f"database {name!r} is not in the restore point (it has {', '.join(sorted(self.paths))})"
            )
        conn = sqlite3.connect(self.paths[name], isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def list_tables(self) -> list[TableInfo]:
        tables = []
        for name in sorted(self.paths):
            conn = self._open(name)
            try:
                for (table,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1"
                ).fetchall():
                    count = conn.execute(f"SELECT count(*) FROM {quote_ident(table)}").fetchone()[0]
                    size = _table_bytes(conn, table)
                    tables.append(TableInfo(name, table, count, size))
            finally:
                conn.close()
        return tables

    def export(self, item: str, tmp: str, *, where: str | None, fmt: str, sink: ExportSink) -> None:
        database, schema, table = split_item(item)
        if schema is not None:
            raise ExploreError("SQLite has no schemas inside a database: give DB.TABLE")
        conn = self._open(database)
        try:
            if table is None:
                conn.execute("PRAGMA query_only = OFF")  # VACUUM INTO writes only its target
                conn.execute("VACUUM INTO ?", (tmp,))
                os.chmod(tmp, 0o600)
                sink.result.bytes = os.path.getsize(tmp)
                sink.first_row()
                return
            known = conn.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?", (table,))
            if known.fetchone() is None:
                raise ExploreError(f"table {table!r} is not in database {database!r} of the restore point")
            cursor = conn.execute(f"SELECT * FROM {quote_ident(table)}" + (f" WHERE {where}" if where else ""))
            sink.write_csv([c[0] for c in cursor.description], cursor, tmp)
        except sqlite3.Error as exc:
            raise ExploreError(f"SQLite: {exc}") from None
        finally:
            conn.close()


def _table_bytes(conn: sqlite3.Connection, table: str) -> int:
    try:
        row = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name = ?", (table,)).fetchone()
        return int(row[0] or 0)
    except sqlite3.Error:  # dbstat is an optional part of SQLite
        return -1
