"""PostgreSQL restore rules: stop the cluster on the target, put the data directory back, recover, start, check.

The image holds the data directory at the snapshot, an atomic copy of a running cluster:
PostgreSQL replays its WAL from the last checkpoint, as after a power cut. A stale postmaster.pid
(it names the source's postmaster) is removed: PostgreSQL would refuse to start if that pid
happened to be alive here.

Replication (the rule that a restored member must not rejoin with an old past):
* authoritative (the default): archive recovery (recovery.signal) that ends by promoting to a new
  timeline. Replicas of the old cluster are ahead of the restored one on the old timeline;
  PostgreSQL refuses to let them follow the new one, so they cannot silently diverge: the
  pre-restore phase lists them as to be re-synced (e.g. restored again with replica_of).
  The new timeline also keeps the restored cluster's WAL names apart from those already archived.
* point in time: the same, with a restore_command reading WAL fetched from the repository and
  recovery_target_time.
* non-authoritative (replica_of): standby.signal and primary_conninfo: the restored member
  streams from the primary from the restored position and catches up.
The recovery settings are reset once the cluster has promoted.
"""

from __future__ import annotations

import os
import re
import time
from datetime import UTC

from surepoint.consistency.restore import (
    RestoreRequest,
    RestoreWriter,
    TargetInUse,
    copy_tree,
    find_in_point,
    owner_of,
    prepare_target_dir,
)
from surepoint.consistency.runner import CommandFailed, one_line

RESTORE_LOG = "surepoint-restore.log"
RECOVERY_SETTINGS = ("restore_command", "recovery_target_time", "recovery_target_action", "recovery_target_inclusive")
NO_ARCHIVE = "false"  # a restore_command that finds nothing: replay what pg_wal holds, then promote
_STOPPED_AT = re.compile(r"recovery stopping (?:before|after) .*")
_FATAL = re.compile(r"(FATAL|PANIC):\s+(.*)")


def pg_bin(major: str, tool: str) -> str:
    return f"/usr/lib/postgresql/{major}/bin/{tool}"


def cluster_major(data_dir: str) -> str:
    try:
        with open(os.path.join(data_dir, "PG_VERSION")) as f:
            return f.read().strip()
    except OSError as exc:
        raise CommandFailed(f"{data_dir} is not a PostgreSQL data directory (no PG_VERSION: {exc.strerror})") from None


def recovery_time(at) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


class PostgresRestore(RestoreWriter):
    name = "postgresql"
    supports_point_in_time = True

    def _as_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0 and self.user != "root":
            return ["runuser", "-u", self.user, "--", *argv]
        return argv

    def _pg_ctl(self, target: str, *args: str, timeout: float = 120) -> object:
        return self.runner.run(self._as_user([pg_bin(self.major, "pg_ctl"), "-D", target, *args]), timeout=timeout + 30)

    def pre_restore(self, request: RestoreRequest) -> str:
        self.source = find_in_point(request.roots, request.metadata.get("data_directory", ""), "PG_VERSION")
        self.major = cluster_major(self.source)
        if not os.path.exists(pg_bin(self.major, "postgres")):
            raise CommandFailed(
                f"the restore point holds a PostgreSQL {self.major} cluster and PostgreSQL {self.major} is not "
                f"installed here ({pg_bin(self.major, 'postgres')} is missing)"
            )
        self.user, self.uid, self.gid = owner_of(self.source)
        if request.os_user:
            import pwd

            entry = pwd.getpwnam(request.os_user)
            self.user, self.uid, self.gid = request.os_user, entry.pw_uid, entry.pw_gid
        target = request.target
        running = (
            os.path.exists(os.path.join(target, "postmaster.pid")) and self._pg_ctl(target, "status").returncode == 0
        )
        if os.path.isdir(target) and os.listdir(target) and not request.overwrite:
            raise TargetInUse(
                f"{target} is not empty; to replace it (the old contents are kept aside), allow overwriting"
            )
        message = f"PostgreSQL {self.major} data directory found at {self.source}"
        if running and not request.replica_of:
            replicas = self._replicas(target)
            self.details["replicas_to_resync"] = replicas
            if replicas:
                message += (
                    f"; replicas of it ({', '.join(replicas)}) must be re-synced from the restored cluster: it comes "
                    "back on a new timeline, which they refuse to follow from their later position"
                )
        if running:
            stop = self._pg_ctl(target, "-w", "-t", "120", "-m", "fast", "stop", timeout=120)
            if stop.returncode != 0:
                raise CommandFailed(f"cannot stop the server running on {target}: {one_line(stop.stderr)}")
            message += f"; stopped the server running on {target}"
        else:
            message += f"; no server running on {target}"
        return message

    def _replicas(self, target: str) -> list[str]:
        """The standbys streaming from the cluster running on `target` (from its postmaster.pid: port, socket)."""
        try:
            with open(os.path.join(target, "postmaster.pid")) as f:
                lines = f.read().splitlines()
            port, socket_dir = lines[3].strip(), lines[4].strip()
        except (OSError, IndexError):
            return []
        argv = ["psql", "-X", "-w", "-A", "-t", "-h", socket_dir or "/tmp", "-p", port, "-d", "postgres", "-c",
                "SELECT coalesce(nullif(application_name, ''), 'walreceiver') || '@' || coalesce(client_addr::text,"
                " 'local socket') FROM pg_stat_replication"]  # fmt: skip
        result = self.runner.run(self._as_user(argv), timeout=60)
        return [line for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []

    def restore(self, request: RestoreRequest) -> str:
        target = request.target
        aside = prepare_target_dir(target, request.overwrite)
        copy_tree(self.runner, self.source, target, request.timeout)
        os.chown(target, self.uid, self.gid)
        os.chmod(target, 0o700)
        notes = [f"data directory copied from {self.source}"]
        if aside:
            notes.append(f"previous contents moved to {aside}")
        for stale in ("postmaster.pid", "recovery.signal", "standby.signal", RESTORE_LOG):
            path = os.path.join(target, stale)
            if os.path.exists(path):
                os.unlink(path)
                if stale == "postmaster.pid":
                    notes.append("stale postmaster.pid removed")
        settings: dict[str, str] = {}
        if request.port:
            settings["port"] = str(request.port)
        if request.socket:
            settings["unix_socket_directories"] = _quote(request.socket)
        if not request.archive:
            settings["archive_mode"] = "off"
        if request.replica_of:
            settings["primary_conninfo"] = _quote(request.replica_of)
            self._signal(target, "standby.signal")
            notes.append(
                "standby.signal and primary_conninfo set: it streams from the primary from the restored position"
            )
        elif request.at is not None:
            if not request.log_dir:
                raise CommandFailed("point-in-time recovery needs WAL from the repository, and none was fetched")
            for name in os.listdir(request.log_dir):
                os.chown(os.path.join(request.log_dir, name), self.uid, self.gid)
            os.chown(request.log_dir, self.uid, self.gid)
            settings.update(
                restore_command=_quote(f'cp "{request.log_dir}/%f" "%p"'),
                recovery_target_time=_quote(recovery_time(request.at)),
                recovery_target_action="'promote'",
                recovery_target_inclusive="on",
            )
            self._signal(target, "recovery.signal")
            notes.append(
                f"recovery.signal and restore_command set: replay {len(request.log_files)} WAL file(s) from the "
                f"repository up to {recovery_time(request.at)}"
            )
        else:
            settings["restore_command"] = _quote(NO_ARCHIVE)
            self._signal(target, "recovery.signal")
            notes.append("recovery.signal set: it replays its WAL and promotes to a new timeline")
        if settings:
            auto = os.path.join(target, "postgresql.auto.conf")
            with open(auto, "a") as f:
                f.write("# set by surepoint restore-app\n")
                f.writelines(f"{k} = {v}\n" for k, v in settings.items())
            os.chown(auto, self.uid, self.gid)
            os.chmod(auto, 0o600)
        return "; ".join(notes)

    def _signal(self, target: str, name: str) -> None:
        path = os.path.join(target, name)
        open(path, "w").close()
        os.chown(path, self.uid, self.gid)

    def _setting(self, target: str, name: str) -> str:
        result = self.runner.run(self._as_user([pg_bin(self.major, "postgres"), "-D", target, "-C", name]), timeout=60)
        return result.check().stdout.strip()

    def post_restore(self, request: RestoreRequest) -> str:
        target = request.target
        if not request.start:
            return "not started, as asked"
        port = str(request.port or self._setting(target, "port"))
        socket_dir = request.socket or self._setting(target, "unix_socket_directories").split(",")[0].strip()
        log = os.path.join(target, RESTORE_LOG)
        started = self._pg_ctl(
            target, "-l", log, "-w", "-t", str(int(request.timeout)), "start", timeout=request.timeout
        )
        if started.returncode != 0:
            raise CommandFailed(f"PostgreSQL did not start: {self._log_error(log) or one_line(started.stderr)}")
        self.details.update(port=int(port), socket_dir=socket_dir, log=log)

        def ask(sql: str) -> str:
            argv = ["psql", "-X", "-w", "-A", "-t", "-h", socket_dir, "-p", port, "-d", "postgres", "-c", sql]
            result = self.runner.run(self._as_user(argv), timeout=60)
            if result.returncode != 0:
                raise CommandFailed(f"PostgreSQL does not answer: {one_line(result.stderr)}")
            return result.stdout.strip()

        notes = [f"accepting connections on port {port} (socket directory {socket_dir})"]
        deadline = time.monotonic() + request.timeout
        if request.replica_of:
            while ask("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") != "1":
                if time.monotonic() > deadline:
                    raise CommandFailed(
                        f"the restored standby is not streaming from the primary: {self._log_error(log)}"
                    )
                time.sleep(0.2)
            notes.append("streaming from the primary (standby)")
        else:
            while ask("SELECT pg_is_in_recovery()") == "t":
                if time.monotonic() > deadline:
                    raise CommandFailed(f"PostgreSQL was still recovering after {request.timeout:.0f} s")
                time.sleep(0.2)
            for setting in RECOVERY_SETTINGS:
                ask(f"ALTER SYSTEM RESET {setting}")
            ask("SELECT pg_reload_conf()")
            timeline = int(ask("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)
            self.details["timeline"] = timeline
            if request.at is not None:
                stopped = self._recovery_stop(log)
                self.details["recovery_stop"] = stopped
                notes.append(f"promoted after point-in-time recovery ({stopped or 'stop point not logged'})")
            notes.append(f"on new timeline {timeline}")
        databases = ask("SELECT count(*) FROM pg_database WHERE datallowconn")
        notes.append(f"{databases} databases answer")
        return "; ".join(notes)

    def _log_error(self, log: str) -> str:
        try:
            with open(log, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        fatal = [m.group(2) for m in map(_FATAL.search, lines) if m]
        return fatal[-1] if fatal else ""

    def _recovery_stop(self, log: str) -> str:
        try:
            with open(log, errors="replace") as f:
                found = _STOPPED_AT.findall(f.read())
        except OSError:
            return ""
        return found[-1] if found else ""


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
