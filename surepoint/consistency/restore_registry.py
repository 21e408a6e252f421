"""The restore rules of each writer type that has some."""

from __future__ import annotations

from surepoint.consistency.restore import RestoreWriter
from surepoint.consistency.restore_mariadb import MariaDBRestore
from surepoint.consistency.restore_postgresql import PostgresRestore
from surepoint.consistency.restore_sqlite import SqliteRestore

RESTORE_WRITERS: dict[str, type[RestoreWriter]] = {
    "postgresql": PostgresRestore,
    "mariadb": MariaDBRestore,
    "sqlite": SqliteRestore,
}
