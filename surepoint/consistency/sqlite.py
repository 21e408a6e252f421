"""SQLite: hold a write lock (BEGIN IMMEDIATE) across the snapshot; checkpoint the WAL after the commit."""

from __future__ import annotations

import itertools

from surepoint.consistency.runner import CommandFailed, Session
from surepoint.consistency.writer import Component, PruneReport, Writer

_markers = itertools.count(1)


def _ask(session: Session, sql: str, timeout: float) -> str:
    marker = f"__surepoint_{next(_markers)}__"
    return session.request(f"{sql}\n.print {marker}\n", marker, timeout)


def _check(output: str, what: str) -> str:
    if "Error" in output or "error:" in output:
        raise CommandFailed(f"sqlite3 {what}: {output.strip().splitlines()[-1]}")
    return output


class SqliteWriter(Writer):
    name = "sqlite"
    has_logs = True

    def _databases(self) -> list[str]:
        dbs = self.config.get("databases") or []
        if not dbs:
            raise CommandFailed("sqlite writer needs `databases`")
        return list(dbs)

    def identify(self) -> list[Component]:
        comps = []
        for db in self._databases():
            comps.append(Component(db, "data", [db]))
            comps.append(Component(db, "log", [db + "-wal", db + "-journal"]))
        return comps

    def prepare(self) -> None:
        self._sessions: dict[str, Session] = {}
        timeout = float(self.config.get("timeout", 30))
        for db in self._databases():
            if not self.runner.exists(db):
                raise CommandFailed(f"database {db} does not exist")
            session = self.runner.open_session([self.config.get("sqlite3", "sqlite3"), "-batch", db])
            self._sessions[db] = session
            _check(_ask(session, f".timeout {int(timeout * 1000)}\nSELECT count(*) FROM sqlite_master;", timeout), db)
            # Fold the WAL into the database first, so the frozen moment has little WAL to replay.
            _check(_ask(session, "PRAGMA wal_checkpoint(PASSIVE);", timeout), db)
            self.metadata.setdefault("journal_mode", {})[db] = _ask(session, "PRAGMA journal_mode;", timeout).strip()

    def freeze(self) -> None:
        timeout = float(self.config.get("timeout", 30))
        for db, session in self._sessions.items():
            # A RESERVED lock: readers go on, no other connection can write until ROLLBACK.
            _check(_ask(session, "BEGIN IMMEDIATE;", timeout), f"{db} freeze")
            self._locked = getattr(self, "_locked", set()) | {db}

    def thaw(self) -> None:
        for db in list(getattr(self, "_locked", set())):
            _ask(self._sessions[db], "ROLLBACK;", 30)
            self._locked.discard(db)

    def post_snapshot(self) -> dict:
        return {"databases": self._databases(), **self.metadata}

    def backup_complete(self, restore_point_id: str) -> None:
        self._close()

    def prune_logs(self, metadata: dict) -> PruneReport:
        report = PruneReport()
        for db in metadata.get("databases", []):
            out = self.runner.run(
                [self.config.get("sqlite3", "sqlite3"), "-batch", db, "PRAGMA wal_checkpoint(TRUNCATE);"], timeout=60
            ).check()
            busy = out.stdout.strip().split("|")[0] if out.stdout.strip() else "0"
            if busy == "0":
                report.pruned.append(f"{db}-wal (checkpointed and truncated)")
        return report

    def abort(self) -> None:
        self.thaw()
        self._close()

    def _close(self) -> None:
        for session in getattr(self, "_sessions", {}).values():
            session.close()
        self._sessions = {}
