"""Closed transaction logs inside a guest, shipped through its guest agent (log_sources.py for the host).

PostgreSQL: the files archive_command put in the writer's `wal_archive` directory of the guest,
listed with `find` and read through a port hot-plugged for the shipping (guest_transfer.py);
MariaDB: the binary logs the guest's server lists after `FLUSH BINARY LOGS` (the SQL runs in the
guest, as for the host), read the same way. A log is removed in the guest only after its record
is durable in the repository (the caller removes what it stored).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from surepoint.consistency.log_sources import WAL_FILE, BinaryLogs, ClosedLog
from surepoint.consistency.runner import CommandFailed
from surepoint.text import printable
from surepoint.timestamps import format_utc


class GuestWalArchive:
    """Closed WAL in the guest's archive directory."""

    writer = "postgresql"

    def __init__(self, runner, config: dict, transfer) -> None:
        self.runner = runner
        self.transfer = transfer
        self.archive = config.get("wal_archive")
        self.sizes: dict[str, int] = {}
        if not self.archive:
            raise CommandFailed("the postgresql writer has no `wal_archive`: there is no archived WAL to ship")

    def closed_logs(self) -> list[ClosedLog]:
        listed = self.runner.run(
            ["find", self.archive, "-maxdepth", "1", "-type", "f", "-printf", "%f\\t%s\\t%T@\\n"], timeout=120
        )
        if listed.returncode != 0:
            raise CommandFailed(f"cannot list the WAL archive {printable(self.archive)} in the guest")
        logs = []
        for line in sorted(listed.stdout.splitlines()):
            name, size, mtime = (line.split("\t") + ["", ""])[:3]
            if WAL_FILE.match(name):
                path = f"{self.archive.rstrip('/')}/{name}"
                self.sizes[path] = int(size)
                # archive_command puts a segment there once complete: its mtime (guest clock) is after its last record
                logs.append(ClosedLog(name, path, format_utc(datetime.fromtimestamp(float(mtime), UTC))))
        return logs

    def read(self, logs: list[ClosedLog]) -> Iterator[tuple[ClosedLog, bytes]]:
        by_path = {log.path: log for log in logs}
        for path, data in self.transfer.receive([(log.path, self.sizes[log.path]) for log in logs]):
            yield by_path[path], data

    def remove_shipped(self, shipped: list[ClosedLog]) -> list[str]:
        if shipped:
            self.runner.run(["rm", "-f", "--", *(log.path for log in shipped)], timeout=120).check()
        return [log.file for log in shipped]


class GuestBinaryLogs(BinaryLogs):
    """Closed binary logs of the MariaDB server in the guest."""

    def __init__(self, runner, config: dict, transfer) -> None:
        super().__init__(runner, config)
        self.transfer = transfer

    def read(self, logs: list[ClosedLog]) -> Iterator[tuple[ClosedLog, bytes]]:
        if not logs:
            return
        sizes = self.runner.run(["stat", "-c", "%s", "--", *(log.path for log in logs)], timeout=120).check()
        by_path = {log.path: log for log in logs}
        wanted = [(log.path, int(size)) for log, size in zip(logs, sizes.stdout.split(), strict=True)]
        for path, data in self.transfer.receive(wanted):
            yield by_path[path], data


GUEST_LOG_SOURCES = {"postgresql": GuestWalArchive, "mariadb": GuestBinaryLogs}
