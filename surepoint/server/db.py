"""The server's database: SQLite (the embedded default) or PostgreSQL, behind one small interface,
with versioned SQL migrations from `migrations/NNNN_name.sql` applied in order at open.

Statements are written once with `?` placeholders; the PostgreSQL side turns them into `%s`.
One connection per server process, serialized by a lock: the server's load is a few writes a
second (session log lines), far below what either database needs a pool for.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from surepoint.errors import SurepointError, UsageError


class DatabaseError(SurepointError):
    """The server's database cannot be opened or migrated."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped with the server, in order."""
    found = []
    for entry in resources.files("surepoint.server.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


class Database:
    """A connection with `?`-style statements that return rows as dicts."""

    dialect = ""
    id_column = ""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None

    # -- dialect hooks ---------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql

    def _rows(self, cursor) -> list[dict]:
        if cursor.description is None:
            return []
        names = [getattr(d, "name", None) or d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- statements -------------------------------------------------------------------------
    def query(self, sql: str, params: tuple | list = ()) -> list[dict]:
        with self._lock:
            cursor = self._conn.execute(self._sql(sql), tuple(params))
            return self._rows(cursor)

    def one(self, sql: str, params: tuple | list = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: tuple | list = ()) -> int:
        """Run a statement; the number of rows it changed."""
        with self._lock:
            cursor = self._conn.execute(self._sql(sql), tuple(params))
            return cursor.rowcount

    def insert(self, sql: str, params: tuple | list = ()) -> int:
        """Run an INSERT ... and return the new row's id."""
        rows = self.query(sql + " RETURNING id", params)
        return int(rows[0]["id"])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """Statements that commit together; other threads wait until it ends."""
        with self._lock:
            self._begin()
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _begin(self) -> None:
        self._conn.execute("BEGIN")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- migrations -------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply the migrations not yet applied; the schema version afterwards."""
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied TEXT NOT NULL)"
            )
            done = {r["version"] for r in self.query("SELECT version FROM schema_migrations")}
            version = max(done, default=0)
            for number, name, sql in migrations():
                if number in done:
                    continue
                with self.transaction():
                    for statement in _statements(sql.replace("{id}", self.id_column)):
                        self._conn.execute(statement)
                    self.execute(
                        "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                        (number, name, now_iso()),
                    )
                version = number
            return version


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class SqliteDatabase(Database):
    dialect = "sqlite"
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str) -> None:
        super().__init__()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # private: it holds password hashes
            os.close(fd)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=30000")
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the server database {path}: {exc}") from None
        self.location = path

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")


class PostgresDatabase(Database):
    dialect = "postgresql"
    id_column = "BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg

        try:
            self._conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to the server database: {str(exc).strip().splitlines()[0]}") from None
        self.location = _redact(url)

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_database(url: str) -> Database:
    """The database at `url` (postgresql://... or a SQLite file path), migrated to the current schema."""
    if url.startswith(("postgresql://", "postgres://")):
        db: Database = PostgresDatabase(url)
    elif url.startswith("sqlite:///"):
        db = SqliteDatabase(url[len("sqlite://") :])
    elif "://" in url:
        raise UsageError(f"unsupported database URL {_redact(url)!r}: give a file path or postgresql://...")
    else:
        db = SqliteDatabase(url)
    try:
        db.migrate()
    except Exception as exc:
        db.close()
        raise DatabaseError(f"cannot migrate the server database {db.location}: {exc}") from None
    return db
