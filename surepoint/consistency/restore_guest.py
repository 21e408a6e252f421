"""Restore rules inside a running guest, through its guest agent: the service of the VM itself comes back.

The point's files are read on the host from the mounted restore point (as for a host restore) and
copied into the guest (consistency/guest_transfer.py); every step in the guest is a guest-exec of
an argument vector. The service is the guest's own systemd unit: the one whose process runs in the
data directory (a PostgreSQL or MariaDB server's working directory is its data directory), or the
one given; the units that can start it on their own (a socket unit: MariaDB's starts the server
at the first connection) are stopped with it and started again afterwards.

PostgreSQL: stop, data directory back (the old one moved aside), stale postmaster.pid removed,
recovery.signal with restore_command (nothing: replay the image's WAL and promote to a new
timeline, or, for a point in time, the WAL copied in from the repository up to
recovery_target_time), start, wait until it accepts connections and has promoted, reset the
recovery settings, count the databases. MariaDB: stop, data directory back, stale pid files
removed, start (InnoDB crash recovery), wait for ping, replay binary logs up to a time if asked,
count the schemas. SQLite: no service; the database file without the newer -wal/-shm/-journal.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from surepoint.consistency.restore import RestoreRequest, RestoreWriter, TargetInUse, find_in_point
from surepoint.consistency.restore_mariadb import binlog_time
from surepoint.consistency.restore_postgresql import RECOVERY_SETTINGS, cluster_major, recovery_time
from surepoint.consistency.runner import CommandFailed, one_line
from surepoint.text import printable

# $1 = data directory, $2 = the server's process name: the systemd unit and pid of the server working there
FIND_SERVER = r"""
for p in $(pgrep -x "$2"); do
    if [ "$(readlink "/proc/$p/cwd")" = "$1" ]; then
        unit=$(sed -n 's|^0::.*/\([^/]*\.service\)$|\1|p' "/proc/$p/cgroup" | head -n 1)
        echo "$p ${unit:--}"
        exit 0
    fi
done
exit 1
"""
STAMP = "%Y%m%d-%H%M%S"


class GuestRestoreWriter(RestoreWriter):
    """Shared steps of a restore in a guest. `transfer` is a GuestTransfer into the same guest."""

    process = ""  # the server's process name

    def __init__(self, runner, transfer) -> None:
        super().__init__(runner)
        self.transfer = transfer
        self.unit: str | None = None
        self.triggers: list[str] = []
        self.active_triggers: list[str] = []

    def guest(self, argv: list[str], timeout: float = 120, what: str = "") -> str:
        result = self.runner.run(argv, timeout=timeout)
        if result.returncode != 0:
            said = printable(one_line(result.stderr or result.stdout)[-300:])
            raise CommandFailed(f"{what or argv[0]} in the guest failed: {said or f'exit status {result.returncode}'}")
        return result.stdout

    def is_dir_with_data(self, path: str) -> bool:
        return self.runner.run(["sh", "-c", 'test -n "$(ls -A -- "$1" 2>/dev/null)"', "sh", path]).returncode == 0

    def find_server(self, target: str) -> tuple[str, str | None] | None:
        """(pid, unit or None) of the server running in `target`, or None."""
        found = self.runner.run(["sh", "-c", FIND_SERVER, "sh", target, self.process], timeout=60)
        if found.returncode != 0 or not found.stdout.strip():
            return None
        pid, unit = found.stdout.split()[:2]
        return pid, (None if unit == "-" else unit)

    def choose_unit(self, request: RestoreRequest, running: tuple[str, str | None] | None, guess: str) -> str:
        unit = request.service or (running[1] if running else None) or guess
        state = self.runner.run(["systemctl", "show", "-p", "LoadState", "--value", unit], timeout=60)
        if state.returncode != 0 or state.stdout.strip() != "loaded":
            if running and not running[1]:
                raise CommandFailed(
                    f"the {self.name} server in the guest (pid {running[0]}) is not a systemd service: "
                    "give the service that runs it"
                )
            raise CommandFailed(f"the guest has no service {printable(unit)}: give the service that runs {self.name}")
        triggered = self.runner.run(["systemctl", "show", "-p", "TriggeredBy", "--value", unit], timeout=60)
        # socket units that would start the server at the next connection: stopped with it, and the
        # active ones started again before it (a socket unit refuses to start beside its running service)
        self.triggers = [t for t in triggered.stdout.split() if t.endswith(".socket")]
        self.active_triggers = [
            t for t in self.triggers if self.runner.run(["systemctl", "is-active", "--quiet", t]).returncode == 0
        ]
        self.unit = unit
        return unit

    def stop_service(self, target: str, timeout: float) -> str:
        assert self.unit
        self.guest(["systemctl", "stop", *self.triggers, self.unit], timeout=timeout, what=f"stopping {self.unit}")
        deadline = time.monotonic() + 30
        while (left := self.find_server(target)) is not None:
            if time.monotonic() > deadline:
                raise CommandFailed(f"a {self.name} server (pid {left[0]}) still runs in {target} after the stop")
            time.sleep(0.5)
        units = ", ".join([self.unit, *self.triggers])
        return f"stopped {units}"

    def start_service(self, timeout: float) -> None:
        assert self.unit
        for unit in [*self.active_triggers, self.unit]:
            result = self.runner.run(["systemctl", "start", unit], timeout=timeout)
            if result.returncode != 0:
                self.unit = unit
                raise CommandFailed(f"{unit} did not start in the guest: {self.journal()}")

    def journal(self) -> str:
        if not self.unit:
            return ""
        result = self.runner.run(["journalctl", "-u", self.unit, "-n", "4", "--no-pager", "-o", "cat"], timeout=60)
        return printable(one_line(result.stdout)[-400:])

    def owner(self, path: str) -> tuple[str, str, str]:
        """(user name, uid, gid) owning `path` in the guest."""
        user, uid, gid = self.guest(["stat", "-c", "%U %u %g", "--", path]).split()
        return user, uid, gid

    def replace_dir(self, request: RestoreRequest, source: str) -> list[str]:
        """Move the old data directory aside, make a new one as the point's was, copy the point's into it."""
        target = request.target
        notes = []
        st = os.stat(source)
        if self.is_dir_with_data(target):
            aside = f"{target.rstrip('/')}.before-restore-{time.strftime(STAMP)}"
            self.guest(["mv", "-T", "--", target, aside], what="moving the old data directory aside")
            notes.append(f"previous contents moved to {aside}")
        else:
            self.runner.run(["rmdir", "--", target])
        mode = f"{st.st_mode & 0o7777:o}"
        self.guest(["install", "-d", "-m", mode, "-o", str(st.st_uid), "-g", str(st.st_gid), "--", target])
        sent = self.transfer.send(source, ["."], target)
        notes.insert(0, f"data directory copied from {source}: {sent.describe()}")
        self.details.setdefault("transfer", []).append(sent.__dict__)
        return notes

    def check_target(self, request: RestoreRequest) -> None:
        if self.is_dir_with_data(request.target) and not request.overwrite:
            raise TargetInUse(
                f"{request.target} in the guest is not empty; to replace it (the old contents are kept aside), "
                "allow overwriting"
            )

    def send_logs(self, request: RestoreRequest, owner: tuple[str, str]) -> str:
        """The log files fetched from the repository, into a private directory of the guest; its path."""
        guest_dir = f"/var/tmp/surepoint-logs-{secrets.token_hex(4)}"
        self.guest(["install", "-d", "-m", "700", "-o", owner[0], "-g", owner[1], "--", guest_dir])
        names = sorted(os.listdir(request.log_dir or ""))
        for name in names:
            os.chown(os.path.join(request.log_dir, name), int(owner[0]), int(owner[1]))
        sent = self.transfer.send(request.log_dir, names, guest_dir)
        self.details["log_dir"] = guest_dir
        self.details.setdefault("transfer", []).append(sent.__dict__)
        return guest_dir


class GuestPostgresRestore(GuestRestoreWriter):
    name = "postgresql"
    process = "postgres"
    supports_point_in_time = True

    def pre_restore(self, request: RestoreRequest) -> str:
        self.source = find_in_point(request.roots, request.metadata.get("data_directory", ""), "PG_VERSION")
        self.major = cluster_major(self.source)
        binary = f"/usr/lib/postgresql/{self.major}/bin/postgres"
        if not self.runner.exists(binary):
            have = self.runner.run(["ls", "/usr/lib/postgresql"]).stdout.split()
            raise CommandFailed(
                f"the restore point holds a PostgreSQL {self.major} cluster and the guest has no PostgreSQL "
                f"{self.major} ({binary} is missing; installed: {', '.join(map(printable, have)) or 'none'})"
            )
        self.check_target(request)
        running = self.find_server(request.target)
        match = re.fullmatch(r"/var/lib/postgresql/([^/]+)/([^/]+)/?", request.target)
        guess = f"postgresql@{match[1]}-{match[2]}.service" if match else "postgresql.service"
        unit = self.choose_unit(request, running, guess)
        message = f"PostgreSQL {self.major} data directory found at {self.source}; service {unit}"
        if running:
            return f"{message}; {self.stop_service(request.target, request.timeout)}"
        self.guest(["systemctl", "stop", *self.triggers, unit], timeout=request.timeout)
        return f"{message}; no server running in {request.target}"

    def restore(self, request: RestoreRequest) -> str:
        target = request.target
        notes = self.replace_dir(request, self.source)
        stale = self.runner.run(["rm", "-v", "-f", "--"] + [f"{target}/{n}" for n in
                                ("postmaster.pid", "recovery.signal", "standby.signal")]).stdout  # fmt: skip
        if "postmaster.pid" in stale:
            notes.append("stale postmaster.pid removed")
        user, uid, gid = self.owner(target)
        self.user = user
        settings: dict[str, str] = {}
        if request.at is not None:
            if not request.log_dir:
                raise CommandFailed("point-in-time recovery needs WAL from the repository, and none was fetched")
            wal_dir = self.send_logs(request, (uid, gid))
            settings.update(
                restore_command=_quote(f'cp "{wal_dir}/%f" "%p"'),
                recovery_target_time=_quote(recovery_time(request.at)),
                recovery_target_action="'promote'",
                recovery_target_inclusive="on",
            )
            notes.append(
                f"recovery.signal and restore_command set: replay {len(request.log_files)} WAL file(s) from the "
                f"repository up to {recovery_time(request.at)}"
            )
        else:
            settings["restore_command"] = _quote("false")
            notes.append("recovery.signal set: it replays its WAL and promotes to a new timeline")
        text = "# set by surepoint restore-app\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        self._append(f"{target}/postgresql.auto.conf", text.encode(), uid, gid)
        self.guest(["install", "-m", "600", "-o", uid, "-g", gid, "/dev/null", f"{target}/recovery.signal"])
        return "; ".join(notes)

    def _append(self, path: str, data: bytes, uid: str, gid: str) -> None:
        if self.runner.run(["test", "-e", path]).returncode != 0:
            # guest-file-open would create it readable and writable by every guest user (0666)
            self.guest(["install", "-m", "600", "-o", uid, "-g", gid, "/dev/null", path])
        with self.runner.lock:
            handle = self.runner.agent.file_open(path, "a")
            try:
                self.runner.agent.file_write(handle, data)
            finally:
                self.runner.agent.file_close(handle)
        self.guest(["chown", f"{uid}:{gid}", "--", path])

    def post_restore(self, request: RestoreRequest) -> str:
        if not request.start:
            return "not started, as asked"
        self.start_service(request.timeout)
        deadline = time.monotonic() + request.timeout
        port = socket_dir = ""
        while True:
            pid_file = self.runner.run(["cat", "--", f"{request.target}/postmaster.pid"]).stdout.splitlines()
            if len(pid_file) >= 5:
                port, socket_dir = pid_file[3].strip(), pid_file[4].strip() or "/var/run/postgresql"
                probe = self._psql(port, socket_dir, "SELECT pg_is_in_recovery()")
                if probe.returncode == 0 and probe.stdout.strip() == "f":
                    break
            if self.runner.run(["systemctl", "is-failed", "--quiet", self.unit or ""]).returncode == 0:
                raise CommandFailed(f"PostgreSQL did not start in the guest: {self.journal()}")
            if time.monotonic() > deadline:
                raise CommandFailed(f"PostgreSQL in the guest was not ready after {request.timeout:.0f} s")
            time.sleep(0.5)

        statements = [f"ALTER SYSTEM RESET {setting}" for setting in RECOVERY_SETTINGS] + [
            "SELECT pg_reload_conf()",
            "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            "SELECT count(*) FROM pg_database WHERE datallowconn",
        ]
        result = self._psql(port, socket_dir, *statements)
        answers = result.stdout.split()
        if result.returncode != 0 or len(answers) < 3:
            raise CommandFailed(f"PostgreSQL in the guest does not answer: {printable(one_line(result.stderr))}")
        timeline, databases = int(answers[-2], 16), answers[-1]
        self.details.update(timeline=timeline, port=int(port), socket_dir=socket_dir)
        notes = [f"{self.unit} started, accepting connections on port {port}"]
        if request.at is not None:
            notes.append(f"promoted after point-in-time recovery to {recovery_time(request.at)}")
            self.runner.run(["rm", "-rf", "--", self.details.get("log_dir", "/nonexistent")])
        notes.append(f"on new timeline {timeline}")
        notes.append(f"{databases} databases answer")
        return "; ".join(notes)

    def _psql(self, port: str, socket_dir: str, *statements: str):
        argv = ["runuser", "-u", self.user, "--", "psql", "-X", "-w", "-q", "-A", "-t", "-h", socket_dir, "-p", port,
                "-d", "postgres"]  # fmt: skip
        for sql in statements:
            argv += ["-c", sql]
        return self.runner.run(argv, timeout=60)


class GuestMariaDBRestore(GuestRestoreWriter):
    name = "mariadb"
    process = "mariadbd"
    supports_point_in_time = True

    def pre_restore(self, request: RestoreRequest) -> str:
        self.source = find_in_point(request.roots, request.metadata.get("datadir", ""), "mysql")
        self._check_version()
        self.check_target(request)
        running = self.find_server(request.target)
        unit = self.choose_unit(request, running, "mariadb.service")
        message = f"MariaDB data directory found at {self.source}; service {unit}"
        if running:
            return f"{message}; {self.stop_service(request.target, request.timeout)}"
        self.guest(["systemctl", "stop", *self.triggers, unit], timeout=request.timeout)
        return f"{message}; no server running in {request.target}; stopped {', '.join([unit, *self.triggers])}"

    def _check_version(self) -> None:
        """The data directory's format version (mysql_upgrade_info) against the guest's server: same major."""
        try:
            with open(os.path.join(self.source, "mysql_upgrade_info")) as f:
                wrote = f.read().strip()
        except OSError:
            return  # never upgraded: no version to compare
        said = self.guest(["mariadbd", "--version"], what="mariadbd --version")
        have = re.search(r"Ver\s+(\d+\.\d+)", said)
        want = re.match(r"(\d+\.\d+)", wrote)
        if have and want and have[1] != want[1]:
            raise CommandFailed(
                f"the restore point holds a MariaDB {want[1]} data directory and the guest runs MariaDB {have[1]}"
            )

    def restore(self, request: RestoreRequest) -> str:
        notes = self.replace_dir(request, self.source)
        removed = self.runner.run(["sh", "-c", 'cd -- "$1" && rm -v -f -- *.pid mysql.sock', "sh", request.target])
        if ".pid" in removed.stdout:
            notes.append("stale pid files removed")
        if request.metadata.get("binlog_file"):
            position = f"{request.metadata['binlog_file']}:{request.metadata.get('binlog_position')}"
            self.details["binlog_position"] = position
            notes.append(f"binary log position at the snapshot {position}")
        if request.at is not None:
            if not request.log_dir or not request.log_files:
                raise CommandFailed("point-in-time recovery needs binary logs from the repository; none was fetched")
            self.log_dir = self.send_logs(request, ("0", "0"))
        return "; ".join(notes)

    def post_restore(self, request: RestoreRequest) -> str:
        if not request.start:
            return "not started, as asked"
        self.start_service(request.timeout)
        deadline = time.monotonic() + request.timeout
        while self.runner.run(["mariadb-admin", "--connect-timeout=5", "ping"], timeout=30).returncode != 0:
            if self.runner.run(["systemctl", "is-failed", "--quiet", self.unit or ""]).returncode == 0:
                raise CommandFailed(f"MariaDB did not start in the guest: {self.journal()}")
            if time.monotonic() > deadline:
                raise CommandFailed(f"MariaDB in the guest did not answer within {request.timeout:.0f} s")
            time.sleep(0.5)
        notes = [f"{self.unit} started, answering"]
        if request.at is not None:
            notes.append(self._replay(request))
        schemas = self.guest(["mariadb", "-N", "-B", "-e", "SELECT count(*) FROM information_schema.schemata"])
        notes.append(f"{schemas.strip()} schemas answer")
        return "; ".join(notes)

    def _replay(self, request: RestoreRequest) -> str:
        position = request.metadata.get("binlog_position")
        files = [f"{self.log_dir}/{name}" for name in request.log_files]
        script = 'TZ=UTC mariadb-binlog --disable-log-bin "$@" | mariadb; s="$?"; exit "$s"'
        argv = ["/bin/bash", "-o", "pipefail", "-c", script, "sh", f"--start-position={position}",
                f"--stop-datetime={binlog_time(request.at)}", *files]  # fmt: skip
        self.guest(argv, timeout=request.timeout, what="replaying the binary logs")
        self.runner.run(["rm", "-rf", "--", self.log_dir])
        self.details["recovery_stop"] = binlog_time(request.at)
        first = request.log_files[0]
        return f"replayed {len(files)} binary log(s) from {first}:{position} up to {binlog_time(request.at)} UTC"


class GuestSqliteRestore(GuestRestoreWriter):
    name = "sqlite"

    def pre_restore(self, request: RestoreRequest) -> str:
        databases = request.metadata.get("databases") or []
        if not databases:
            raise CommandFailed("the restore point lists no SQLite database")
        self.plan: dict[str, str] = {}
        for db in databases:
            target = db if request.target in ("", db) else request.target
            if len(databases) > 1 and request.target not in ("", db):
                target = f"{request.target.rstrip('/')}/{os.path.basename(db)}"
            self.plan[find_in_point(request.roots, db, "")] = target
            if self.runner.exists(target):
                if not request.overwrite:
                    raise TargetInUse(f"{target} exists in the guest; allow overwriting to replace it")
                probe = self.runner.run(["sqlite3", "-batch", target, ".timeout 2000", "BEGIN EXCLUSIVE;", "ROLLBACK;"])
                if probe.returncode != 0 or "locked" in probe.stderr + probe.stdout:
                    raise CommandFailed(f"{target} is in use in the guest (locked by another connection)")
        return f"{len(self.plan)} database(s): " + ", ".join(f"{s} -> {t}" for s, t in self.plan.items())

    def restore(self, request: RestoreRequest) -> str:
        notes = []
        for source, target in self.plan.items():
            directory, base = os.path.dirname(source), os.path.basename(source)
            names = [
                n
                for n in (base, base + "-wal", base + "-journal")
                if os.path.exists(os.path.join(directory, n))
                and (n == base or os.path.getsize(os.path.join(directory, n)))
            ]
            staging = f"{os.path.dirname(target)}/.surepoint-restore-{secrets.token_hex(4)}"
            self.guest(["mkdir", "-m", "700", "--", staging])
            try:
                sent = self.transfer.send(directory, names, staging)
                removed = self.runner.run(["rm", "-v", "-f", "--", *(target + s for s in ("-wal", "-shm", "-journal"))])
                for name in names:
                    self.guest(["mv", "-f", "-T", "--", f"{staging}/{name}", target + name[len(base) :]])
            finally:
                self.runner.run(["rm", "-rf", "--", staging])
            note = f"{target} restored ({sent.describe()})"
            if removed.stdout.strip():
                note += "; removed the newer -wal/-shm/-journal"
            notes.append(note)
        return "; ".join(notes)

    def post_restore(self, request: RestoreRequest) -> str:
        notes = []
        for target in self.plan.values():
            argv = ["sqlite3", "-batch", target, "PRAGMA integrity_check;", "PRAGMA wal_checkpoint(TRUNCATE);",
                    "SELECT count(*) FROM sqlite_master WHERE type='table';"]  # fmt: skip
            out = self.guest(argv, timeout=request.timeout)
            lines = out.split()
            if not lines or lines[0] != "ok":
                raise CommandFailed(f"{target} fails its integrity check: {printable(' '.join(lines[:3]))}")
            notes.append(f"{target}: integrity ok, {lines[-1]} tables")
        return "; ".join(notes)


GUEST_RESTORE_WRITERS: dict[str, type[GuestRestoreWriter]] = {
    "postgresql": GuestPostgresRestore,
    "mariadb": GuestMariaDBRestore,
    "sqlite": GuestSqliteRestore,
}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
