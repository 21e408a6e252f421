"""MariaDB / MySQL: FLUSH TABLES WITH READ LOCK held in one session across the snapshot.

The binary log position at the frozen moment is recorded; after the restore point is committed,
binary logs before the one in use at the snapshot are purged (PURGE BINARY LOGS TO).
"""

from __future__ import annotations

import itertools
import re

from surepoint.consistency.runner import CommandFailed, Session
from surepoint.consistency.writer import Component, PruneReport, Writer
from surepoint.timestamps import utc_now

_markers = itertools.count(1)
# what the client itself says on stderr (merged into the session's output): "mariadb: [Warning] World-writable
# config file ... is ignored", "Warning: Using a password ...". Never a result row: those are tab-separated.
_CLIENT_NOTICE = re.compile(r"^((\S*/)?(mariadb|mysql)[\w.-]*: |warning\b|\[warning\])", re.IGNORECASE)


def result_rows(output: str) -> list[list[str]]:
    """The rows of a batch-mode answer; the client's own notices skipped, its errors raised."""
    rows = []
    for line in output.splitlines():
        if line.startswith("ERROR"):
            raise CommandFailed(f"MariaDB: {line}")
        if not line.strip() or ("\t" not in line and _CLIENT_NOTICE.match(line)):
            continue
        rows.append(line.split("\t"))
    return rows


class MariaDBWriter(Writer):
    name = "mariadb"
    has_logs = True

    def _argv(self) -> list[str]:
        argv = [
            self.config.get("client", "mariadb"),
            "--batch",
            "--skip-column-names",
            "--unbuffered",
            "--connect-timeout=10",
        ]
        for key, flag in (("socket", "--socket"), ("host", "--host"), ("port", "--port"), ("user", "--user")):
            if self.config.get(key) is not None:
                argv.append(f"{flag}={self.config[key]}")
        return argv

    def _env(self) -> dict[str, str]:
        password = self.secret("password")
        return {"MYSQL_PWD": password} if password else {}

    def _ask(self, sql: str, timeout: float = 60) -> list[list[str]]:
        marker = f"__surepoint_{next(_markers)}__"
        return result_rows(self._session.request(f"{sql}\nSELECT '{marker}';\n", marker, timeout))

    def identify(self) -> list[Component]:
        self._session: Session = self.runner.open_session(self._argv(), env=self._env())
        try:
            rows = self._ask("SELECT @@datadir, @@log_bin, @@log_bin_basename, @@version;", timeout=30)
        except CommandFailed as exc:
            raise CommandFailed(f"cannot connect to MariaDB: {exc}") from None
        datadir, log_bin, basename, version = (rows[0] + ["", "", "", ""])[:4]
        self.metadata.update(datadir=datadir, log_bin=log_bin == "1", binlog_basename=basename, version=version)
        comps = [Component("server", "data", [datadir])]
        if log_bin == "1":
            comps.append(Component("binary logs", "log", [basename + ".*"]))
        return comps

    def prepare(self) -> None:
        # Bound how long FLUSH TABLES WITH READ LOCK may wait behind long statements.
        self._ask(f"SET SESSION lock_wait_timeout = {int(self.config.get('lock_wait_timeout', 10))};")

    def freeze(self) -> None:
        self._ask("FLUSH TABLES WITH READ LOCK;", timeout=float(self.config.get("lock_wait_timeout", 10)) + 20)
        self._locked = True
        # Nothing commits until UNLOCK TABLES: the image holds exactly the commits before this moment.
        self.metadata["snapshot_time"] = utc_now()
        if self.metadata.get("log_bin"):
            rows = self._ask("SHOW MASTER STATUS;")
            if rows:
                self.metadata.update(binlog_file=rows[0][0], binlog_position=int(rows[0][1]))
        # where a replica restored from this point starts: what it applied as a replica, or, restored from
        # a primary's point, what the primary had written (restore_mariadb.py)
        gtid = self._ask("SELECT @@gtid_binlog_pos, @@gtid_slave_pos;")
        if gtid:
            row = gtid[0] + ["", ""]
            self.metadata.update(gtid_binlog_pos=row[0], gtid_slave_pos=row[1])

    def thaw(self) -> None:
        if getattr(self, "_locked", False):
            self._ask("UNLOCK TABLES;")
            self._locked = False

    def backup_complete(self, restore_point_id: str) -> None:
        self._close()

    def prune_logs(self, metadata: dict) -> PruneReport:
        keep_from = metadata.get("binlog_file")
        if not metadata.get("log_bin") or not keep_from:
            return PruneReport(kept_from="binary logging is off: nothing to prune")
        session = self.runner.open_session(self._argv(), env=self._env())
        self._session = session
        try:
            before = {r[0] for r in self._ask("SHOW BINARY LOGS;")}
            self._ask(f"PURGE BINARY LOGS TO '{_quote(keep_from)}';")
            after = {r[0] for r in self._ask("SHOW BINARY LOGS;")}
        finally:
            self._close()
        return PruneReport(pruned=sorted(before - after), kept_from=keep_from)

    def abort(self) -> None:
        try:
            self.thaw()
        except CommandFailed:
            pass
        self._close()

    def _close(self) -> None:
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()
            self._session = None


def _quote(name: str) -> str:
    if not all(c.isalnum() or c in "._-" for c in name):
        raise CommandFailed(f"unexpected binary log name {name!r}")
    return name
