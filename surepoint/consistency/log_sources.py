"""Where a writer's closed transaction logs are on the server, and how they are removed there once shipped.

PostgreSQL: the files archive_command put in the writer's `wal_archive` directory (WAL segments,
timeline history files, backup history files); each is complete when it appears there.
MariaDB: `FLUSH BINARY LOGS` closes the binary log in use, so every listed log but the new last
one is complete; `PURGE BINARY LOGS TO` removes them (the server keeps its index consistent).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from surepoint.consistency.mariadb import MariaDBWriter, _quote
from surepoint.consistency.runner import CommandFailed, CommandRunner
from surepoint.timestamps import format_utc

WAL_FILE = re.compile(r"^[0-9A-F]{24}(\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$")


@dataclass
class ClosedLog:
    file: str  # the log's own name
    path: str  # where it is readable on this host
    covers_until: str  # ISO UTC: every change made before this moment is in this log or an earlier one


def _iso(ts: float) -> str:
    return format_utc(datetime.fromtimestamp(ts, UTC))


class WalArchive:
    """Closed WAL in a PostgreSQL writer's archive directory."""

    writer = "postgresql"

    def __init__(self, runner: CommandRunner, config: dict) -> None:
        self.archive = config.get("wal_archive")
        if not self.archive:
            raise CommandFailed("the postgresql writer has no `wal_archive`: there is no archived WAL to ship")

    def closed_logs(self) -> list[ClosedLog]:
        logs = []
        for name in sorted(os.listdir(self.archive)):
            if WAL_FILE.match(name):
                path = os.path.join(self.archive, name)
                # archive_command copies a segment only once it is complete: its mtime is after its last record.
                logs.append(ClosedLog(name, path, _iso(os.stat(path).st_mtime)))
        return logs

    def remove_shipped(self, shipped: list[ClosedLog]) -> list[str]:
        for log in shipped:
            os.unlink(log.path)
        return [log.file for log in shipped]

    def read(self, logs: list[ClosedLog]) -> Iterator[tuple[ClosedLog, bytes]]:
        for log in logs:
            with open(log.path, "rb") as f:
                yield log, f.read()


class BinaryLogs:
    """Closed binary logs of a MariaDB server on this host."""

    writer = "mariadb"

    def __init__(self, runner: CommandRunner, config: dict) -> None:
        self.runner = runner
        self.client = MariaDBWriter(runner, config)

    def _sql(self, sql: str) -> list[list[str]]:
        result = self.runner.run([*self.client._argv(), "-e", sql], env=self.client._env(), timeout=120).check()
        return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]

    def closed_logs(self) -> list[ClosedLog]:
        basename = self._sql("SELECT @@log_bin, @@log_bin_basename")
        if not basename or basename[0][0] != "1":
            raise CommandFailed("binary logging is off on this MariaDB server: there are no logs to ship")
        directory = os.path.dirname(basename[0][1])
        self._sql("FLUSH BINARY LOGS")
        flushed = _iso(datetime.now(UTC).timestamp())
        listed = [row[0] for row in self._sql("SHOW BINARY LOGS")]
        self.active = listed[-1]
        return [ClosedLog(name, os.path.join(directory, name), flushed) for name in listed[:-1]]

    def remove_shipped(self, shipped: list[ClosedLog], wait: float = 30.0) -> list[str]:
        """PURGE BINARY LOGS up to the first log not shipped.

        The server keeps a closed log until InnoDB has made its transactions durable and a binlog
        checkpoint in a later log says so; PURGE skips it until then (a warning, not an error). That
        follows a FLUSH BINARY LOGS within moments, so the purge is repeated until the shipped logs
        are gone or `wait` seconds passed (then they stay, and the next shipping purges them).
        """
        if not shipped:
            return []
        before = {row[0] for row in self._sql("SHOW BINARY LOGS")}
        keep_from = next((n for n in sorted(before) if n > shipped[-1].file), self.active)
        wanted = {log.file for log in shipped} & before
        deadline = time.monotonic() + wait
        while True:
            self._sql(f"PURGE BINARY LOGS TO '{_quote(keep_from)}'")
            after = {row[0] for row in self._sql("SHOW BINARY LOGS")}
            if not wanted & after or time.monotonic() > deadline:
                return sorted(before - after)
            time.sleep(0.2)

    def read(self, logs: list[ClosedLog]) -> Iterator[tuple[ClosedLog, bytes]]:
        for log in logs:
            with open(log.path, "rb") as f:
                yield log, f.read()


LOG_SOURCES = {"postgresql": WalArchive, "mariadb": BinaryLogs}
