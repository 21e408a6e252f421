"""PostgreSQL: a non-exclusive base backup (pg_backup_start / pg_backup_stop) held in one session.

The backup starts in prepare (it waits for a checkpoint, which must not lengthen the freeze),
the snapshot is taken while it is in progress, and pg_backup_stop after the snapshot returns the
backup label and waits until the WAL the backup needs is archived. After the restore point is
committed, archived WAL older than the backup's start segment can be pruned (pg_archivecleanup).
"""

from __future__ import annotations

import itertools
import re

from surepoint.consistency.runner import CommandFailed, Session
from surepoint.consistency.writer import Component, PruneReport, Writer
from surepoint.timestamps import utc_now

_markers = itertools.count(1)
START_WAL = re.compile(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)")
_SERVER_MESSAGE = re.compile(r"(NOTICE|WARNING|INFO|LOG|DEBUG\d?|DETAIL|HINT|CONTEXT):  ")


class PostgresWriter(Writer):
    name = "postgresql"
    has_logs = True

    def _env(self) -> dict[str, str]:
        env = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "surepoint"}
        for key, var in (
            ("host", "PGHOST"),
            ("port", "PGPORT"),
            ("user", "PGUSER"),
            ("dbname", "PGDATABASE"),
        ):
            if self.config.get(key) is not None:
                env[var] = str(self.config[key])
        if (password := self.secret("password")) is not None:
            env["PGPASSWORD"] = password
        return env

    def _argv(self, tool: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.config["os_user"], "--"] if self.config.get("os_user") else []
        return [*prefix, tool, *args]

    def _ask(self, sql: str, timeout: float = 60) -> list[list[str]]:
        marker = f"__surepoint_{next(_markers)}__"
        out = self._session.request(f"{sql}\n\\echo {marker}\n", marker, timeout)
        for line in out.splitlines():
            if line.startswith(("ERROR:", "FATAL:", "psql:")):
                raise CommandFailed(f"PostgreSQL: {line}")
        # stderr shares the pipe: server messages (pg_backup_stop's NOTICE that the WAL is archived,
        # WARNINGs while it waits) are not result rows.
        return [line.split("|") for line in out.splitlines() if line.strip() and not _SERVER_MESSAGE.match(line)]

    def identify(self) -> list[Component]:
        self._session: Session = self.runner.open_session(
            self._argv(
                "psql",
                "-X",
                "-w",  # never prompt for a password on the terminal: fail at once
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=0",
                "-d",
                str(self.config.get("dbname", "postgres")),
            ),
            env=self._env(),
        )
        try:
            rows = self._ask(
                "SELECT current_setting('data_directory'), current_setting('server_version_num'),"
                " current_setting('archive_mode'), current_setting('archive_command');",
                timeout=30,
            )
        except CommandFailed as exc:
            raise CommandFailed(f"cannot connect to PostgreSQL: {exc}") from None
        if not rows:
            raise CommandFailed("cannot connect to PostgreSQL (no answer)")
        data_dir, version, archive_mode, archive_command = (rows[0] + ["", "", "", ""])[:4]
        self.metadata.update(
            data_directory=data_dir,
            server_version_num=version,
            archive_mode=archive_mode,
            archive_command=archive_command,
            wal_archive=self.config.get("wal_archive"),
        )
        comps = [Component("cluster", "data", [data_dir]), Component("wal", "log", [f"{data_dir}/pg_wal"])]
        if self.config.get("wal_archive"):
            comps.append(Component("wal archive", "log", [self.config["wal_archive"]]))
        return comps

    def prepare(self) -> None:
        self._ask(
            "SELECT pg_backup_start('surepoint', true);", timeout=float(self.config.get("checkpoint_timeout", 300))
        )
        self._in_backup = True

    def post_snapshot(self) -> dict:
        # After the snapshot: a point-in-time restore picks this point only for times after it.
        self.metadata["snapshot_time"] = utc_now()
        rows = self._ask(
            "SELECT lsn, encode(convert_to(labelfile, 'UTF8'), 'hex'),"
            " encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') FROM pg_backup_stop(true);",
            timeout=float(self.config.get("archive_wait_timeout", 300)),
        )
        self._in_backup = False
        lsn, label_hex, spcmap_hex = rows[0][:3]
        label = bytes.fromhex(label_hex).decode()
        match = START_WAL.search(label)
        self.metadata.update(
            stop_lsn=lsn,
            backup_label=label,
            tablespace_map=bytes.fromhex(spcmap_hex).decode(),
            start_wal_file=match.group(1) if match else None,
        )
        return dict(self.metadata)

    def backup_complete(self, restore_point_id: str) -> None:
        self._close()

    def prune_logs(self, metadata: dict) -> PruneReport:
        archive = metadata.get("wal_archive") or self.config.get("wal_archive")
        start = metadata.get("start_wal_file")
        if not archive:
            return PruneReport(kept_from="no WAL archive configured: PostgreSQL recycles its own WAL")
        if not start:
            raise CommandFailed("the backup label names no start WAL file: nothing pruned")
        tool = self._archivecleanup(metadata.get("server_version_num", ""))
        listing = self.runner.run(self._argv(tool, "-n", archive, start), timeout=120).check()
        self.runner.run(self._argv(tool, archive, start), timeout=300).check()
        pruned = sorted(line.rsplit("/", 1)[-1] for line in listing.stdout.splitlines() if line.strip())
        return PruneReport(pruned=pruned, kept_from=start)

    def _archivecleanup(self, version_num: str) -> str:
        if self.config.get("pg_archivecleanup"):
            return self.config["pg_archivecleanup"]
        major = version_num[:2] if version_num else "15"
        path = f"/usr/lib/postgresql/{major}/bin/pg_archivecleanup"
        return path if self.runner.exists(path) else "pg_archivecleanup"

    def abort(self) -> None:
        if getattr(self, "_in_backup", False):
            try:
                self._ask("SELECT pg_backup_stop(false);", timeout=30)
            except CommandFailed:
                pass
            self._in_backup = False
        self._close()

    def _close(self) -> None:
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()
            self._session = None
