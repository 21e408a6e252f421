"""PostgreSQL restore rules: stop the cluster on the target, put the data directory back, recover, start, check.

The image holds the data directory at the snapshot, an atomic copy of a running cluster: started
as it is, PostgreSQL replays its own WAL from the last checkpoint, as after a power cut. Point in
time: recovery.signal, a restore_command reading WAL fetched from the repository, and
recovery_target_time; the cluster promotes at the target and the recovery settings are reset
once it has. A stale postmaster.pid (it names the source's postmaster) is removed: PostgreSQL
would refuse to start if that pid happened to be alive here.
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
        if running:
            stop = self._pg_ctl(target, "-w", "-t", "120", "-m", "fast", "stop", timeout=120)
            if stop.returncode != 0:
                raise CommandFailed(f"cannot stop the server running on {target}: {one_line(stop.stderr)}")
            message += f"; stopped the server running on {target}"
        else:
            message += f"; no server running on {target}"
        return message

    def restore(self, request: RestoreRequest) -> str:
        target = request.target
        aside = prepare_target_dir(target, request.overwrite)
        copy_tree(self.runner, self.source, target, request.timeout)
        os.chown(target, self.uid, self.gid)
        os.chmod(target, 0o700)
        notes = [f"data directory copied from {self.source}"]
        if aside:
            notes.append(f"previous contents moved to {aside}")
        for stale in ("postmaster.pid", "recovery.signal", RESTORE_LOG):
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
        if request.at is not None:
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
            signal = os.path.join(target, "recovery.signal")
            open(signal, "w").close()
            os.chown(signal, self.uid, self.gid)
            notes.append(
                f"recovery.signal and restore_command set: replay {len(request.log_files)} WAL file(s) from the "
                f"repository up to {recovery_time(request.at)}"
            )
        if settings:
            auto = os.path.join(target, "postgresql.auto.conf")
            with open(auto, "a") as f:
                f.write("# set by surepoint restore-app\n")
                f.writelines(f"{k} = {v}\n" for k, v in settings.items())
            os.chown(auto, self.uid, self.gid)
            os.chmod(auto, 0o600)
        return "; ".join(notes)

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
        if request.at is not None:
            deadline = time.monotonic() + request.timeout
            while ask("SELECT pg_is_in_recovery()") == "t":
                if time.monotonic() > deadline:
                    raise CommandFailed(f"PostgreSQL was still recovering after {request.timeout:.0f} s")
                time.sleep(0.2)
            stopped = self._recovery_stop(log)
            self.details["recovery_stop"] = stopped
            for setting in RECOVERY_SETTINGS:
                ask(f"ALTER SYSTEM RESET {setting}")
            ask("SELECT pg_reload_conf()")
            notes.append(f"promoted after point-in-time recovery ({stopped or 'stop point not logged'})")
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
