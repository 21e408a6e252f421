"""MariaDB restore rules: stop the server on the target, put the data directory back, start (InnoDB crash
recovery, with the binary logs that settle prepared transactions), check; point in time: replay
binary logs from the repository from the position recorded at the freeze up to the target time
(mariadb-binlog --stop-datetime).

The server is started with --no-defaults and what the restore was given (socket, port, user) and
binary logging as at the backup; the replayed logs are not logged a second time
(--disable-log-bin).

Replication (GTID), the rule that a restored member must not rejoin with an old past:
* authoritative (the default, for a server with binary logging): the restored server gets a new
  identity: a new server_id and a new gtid_domain_id (one above every domain in its binary logs),
  so what it writes from now on can never be taken for the old history. Its old replicas ask for
  a GTID of the old domain beyond what it has; MariaDB refuses them (error 1236: not in the
  master's binary log): they stop instead of diverging. The pre-restore phase lists them
  (`replicas_to_resync`) from the running server's binlog dump threads.
* non-authoritative (replica_of "host=... port=... user=... password=..."): the restored server
  becomes a replica of that primary from the restored position (the GTID it had applied as a
  replica, or, restored from a primary's point, the GTID the primary had written), with a new
  server_id, and catches up.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
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
    tail,
    which,
)
from surepoint.consistency.runner import CommandFailed, one_line

ERROR_LOG = "surepoint-restore.err"
PID_FILE = "surepoint-restore.pid"
_CRASH_RECOVERY = re.compile(r"(Starting crash recovery|crash recovery)", re.IGNORECASE)


def binlog_time(at) -> str:
    """mariadb-binlog reads --stop-datetime in the TZ it runs with; it is run with TZ=UTC."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


class MariaDBRestore(RestoreWriter):
    name = "mariadb"
    supports_point_in_time = True

    def _client(self, request: RestoreRequest, *args: str) -> list[str]:
        return ["mariadb", "--batch", "--skip-column-names", "--connect-timeout=10", f"--socket={request.socket}",
                "--user=root", *args]  # fmt: skip

    def _ping(self, request: RestoreRequest) -> bool:
        argv = ["mariadb-admin", f"--socket={request.socket}", "--user=root", "--connect-timeout=5", "ping"]
        return self.runner.run(argv, timeout=30).returncode == 0

    def pre_restore(self, request: RestoreRequest) -> str:
        if not request.socket:
            raise TargetInUse("a MariaDB restore needs the socket file the restored server listens on")
        self.source = find_in_point(request.roots, request.metadata.get("datadir", ""), "mysql")
        self.user = request.os_user or owner_of(self.source)[0]
        self.mariadbd = which("mariadbd", "/usr/sbin/mariadbd")
        target = os.path.realpath(request.target)
        if os.path.isdir(target) and os.listdir(target) and not request.overwrite:
            raise TargetInUse(
                f"{target} is not empty; to replace it (the old contents are kept aside), allow overwriting"
            )
        message = f"MariaDB data directory found at {self.source}"
        if self._ping(request):
            rows = self.runner.run(self._client(request, "-e", "SELECT @@datadir"), timeout=30).check().stdout
            serving = os.path.realpath(rows.strip())
            if serving != target:
                raise TargetInUse(f"another MariaDB server (data directory {serving}) answers on {request.socket}")
            if not request.replica_of:
                dumps = self.runner.run(self._client(request, "-e", REPLICAS_SQL), timeout=30)
                # one per replica host and user (a replica that went away may leave its dump thread a while)
                replicas = sorted({line.strip() for line in dumps.stdout.splitlines() if line.strip()})
                self.details["replicas_to_resync"] = replicas
                if replicas:
                    message += (
                        f"; replicas of it ({', '.join(replicas)}) must be re-synced from the restored server: it "
                        "comes back with a new server identity and GTID domain, and refuses their later position"
                    )
            self.runner.run(
                ["mariadb-admin", f"--socket={request.socket}", "--user=root", "shutdown"], timeout=180
            ).check()
            message += f"; stopped the server running on {target}"
        else:
            message += f"; no server answers on {request.socket}"
        return message

    def restore(self, request: RestoreRequest) -> str:
        target = request.target
        aside = prepare_target_dir(target, request.overwrite)
        copy_tree(self.runner, self.source, target, request.timeout)
        notes = [f"data directory copied from {self.source}"]
        if aside:
            notes.append(f"previous contents moved to {aside}")
        for name in os.listdir(target):
            if name.endswith(".pid") or name in (ERROR_LOG, "mysql.sock"):
                os.unlink(os.path.join(target, name))
        position = request.metadata.get("binlog_file")
        if position:
            notes.append(f"binary log position at the snapshot {position}:{request.metadata.get('binlog_position')}")
            self.details["binlog_position"] = f"{position}:{request.metadata.get('binlog_position')}"
        return "; ".join(notes)

    def post_restore(self, request: RestoreRequest) -> str:
        if not request.start:
            return "not started, as asked"
        target = os.path.realpath(request.target)
        log = os.path.join(target, ERROR_LOG)
        argv = [
            self.mariadbd, "--no-defaults", f"--datadir={target}", f"--socket={request.socket}",
            f"--user={self.user}", f"--pid-file={os.path.join(target, PID_FILE)}", f"--log-error={log}",
            "--innodb-buffer-pool-size=64M",
        ]  # fmt: skip
        argv += [f"--port={request.port}", "--bind-address=127.0.0.1"] if request.port else ["--skip-networking"]
        argv += binlog_options(request.metadata, target)
        if request.replica_of:
            self.primary = parse_primary(request.replica_of)
            argv = [a for a in argv if not a.startswith("--server-id=")] + [f"--server-id={new_server_id()}"]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.details.update(pid=proc.pid, socket=request.socket, log=log)
        deadline = time.monotonic() + request.timeout
        while not self._ping(request):
            if proc.poll() is not None:
                raise CommandFailed(f"mariadbd exited with {proc.returncode}: {tail(log, 3)}")
            if time.monotonic() > deadline:
                raise CommandFailed(f"mariadbd did not answer within {request.timeout:.0f} s: {tail(log, 3)}")
            time.sleep(0.2)
        notes = [f"accepting connections on {request.socket}"]
        with open(log, errors="replace") as f:
            if _CRASH_RECOVERY.search(f.read()):
                notes.append("InnoDB crash recovery ran")
        if request.at is not None:
            notes.append(self._replay(request))
        if request.replica_of:
            notes.append(self._follow(request))
        elif request.metadata.get("log_bin"):
            notes.append(self._new_identity(request))
        schemas = self.runner.run(
            self._client(request, "-e", "SELECT count(*) FROM information_schema.schemata"), timeout=60
        ).check()
        notes.append(f"{schemas.stdout.strip()} schemas answer")
        return "; ".join(notes)

    def _sql(self, request: RestoreRequest, sql: str) -> str:
        result = self.runner.run(self._client(request), input=sql + ";\n", timeout=60)  # a password stays off argv
        if result.returncode != 0:
            raise CommandFailed(f"MariaDB: {one_line(result.stderr)}")
        return result.stdout.strip()

    def _new_identity(self, request: RestoreRequest) -> str:
        """Authoritative: a new server_id and GTID domain, so old replicas cannot take it for their past."""
        state = self._sql(request, "SELECT @@gtid_binlog_state")
        domains = [int(g.split("-")[0]) for g in state.replace(",", " ").split() if g.count("-") == 2]
        domain, server_id = max(domains, default=0) + 1, new_server_id()
        self._sql(request, f"SET GLOBAL gtid_domain_id = {domain}; SET GLOBAL server_id = {server_id}")
        self.details.update(gtid_domain_id=domain, server_id=server_id)
        return (
            f"new server identity: server_id {server_id}, gtid_domain_id {domain} (keep them in its configuration); "
            "replicas that were ahead of it are refused and must be re-synced"
        )

    def _follow(self, request: RestoreRequest) -> str:
        """Non-authoritative: replicate from the primary from the restored position."""
        meta = request.metadata
        position = meta.get("gtid_slave_pos") or meta.get("gtid_binlog_pos")
        if position is None:  # a point from before GTIDs were recorded: what the restored server holds
            held = self._sql(request, "SELECT @@gtid_slave_pos, @@gtid_binlog_pos").split("\t") + [""]
            position = held[0] or held[1]
        primary = self.primary
        options = [
            f"MASTER_HOST={_sql_string(primary['host'])}",
            f"MASTER_PORT={int(primary.get('port', '3306'))}",
            f"MASTER_USER={_sql_string(primary['user'])}",
            f"MASTER_PASSWORD={_sql_string(primary.get('password', ''))}",
            f"MASTER_CONNECT_RETRY={CONNECT_RETRY}",
            "MASTER_USE_GTID=slave_pos",
        ]
        self._sql(
            request,
            f"STOP SLAVE; RESET SLAVE ALL; SET GLOBAL gtid_slave_pos = {_sql_string(position)}; "
            f"CHANGE MASTER TO {', '.join(options)}; START SLAVE",
        )
        deadline = time.monotonic() + request.timeout
        while True:
            status = self._slave_status(request)
            if status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes":
                break
            error = status.get("Last_IO_Error") or status.get("Last_SQL_Error")
            if error or time.monotonic() > deadline:
                raise CommandFailed(f"the restored replica does not follow {primary['host']}: {error or 'no answer'}")
            time.sleep(0.2)
        self.details.update(replica_of=f"{primary['host']}:{primary.get('port', '3306')}", gtid_slave_pos=position)
        return f"replicating from {primary['host']}:{primary.get('port', '3306')} from GTID {position or '(start)'}"

    def _slave_status(self, request: RestoreRequest) -> dict[str, str]:
        argv = [a for a in self._client(request) if a not in ("--batch", "--skip-column-names")]
        result = self.runner.run([*argv, "--vertical", "-e", "SHOW SLAVE STATUS"], timeout=60)
        status = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.strip().partition(": ")
            if sep:
                status[key] = value.strip()
        return status

    def _replay(self, request: RestoreRequest) -> str:
        position = request.metadata.get("binlog_position")
        if not request.log_dir or not request.log_files or position is None:
            raise CommandFailed("point-in-time recovery needs binary logs from the repository, and none was fetched")
        files = [os.path.join(request.log_dir, f) for f in request.log_files]
        decode = [
            "mariadb-binlog", "--disable-log-bin", f"--start-position={position}",
            f"--stop-datetime={binlog_time(request.at)}", *files,
        ]  # fmt: skip
        env = {**os.environ, "TZ": "UTC"}
        with subprocess.Popen(decode, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as producer:
            consumer = subprocess.run(
                self._client(request), stdin=producer.stdout, capture_output=True, timeout=request.timeout
            )
            producer.stdout.close()
            decode_err = producer.stderr.read().decode(errors="replace")
            producer.wait(60)
        if producer.returncode != 0:
            raise CommandFailed(f"mariadb-binlog failed: {one_line(decode_err)}")
        if consumer.returncode != 0:
            raise CommandFailed(f"replaying binary logs failed: {one_line(consumer.stderr.decode(errors='replace'))}")
        self.details["recovery_stop"] = binlog_time(request.at)
        return (
            f"replayed {len(files)} binary log(s) from {request.log_files[0]}:{position} "
            f"up to {binlog_time(request.at)} UTC"
        )


REPLICAS_SQL = (
    "SELECT concat(user, '@', substring_index(host, ':', 1)) FROM information_schema.processlist "
    "WHERE command LIKE 'Binlog Dump%'"
)
CONNECT_RETRY = 5  # seconds between a replica's attempts to reach its primary


def new_server_id() -> int:
    return 1000 + secrets.randbelow(2**31 - 1000)


def parse_primary(text: str) -> dict[str, str]:
    """'host=H port=P user=U password=W' (or password_file=F) -> its parts; host and user are required."""
    parts = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep or key not in ("host", "port", "user", "password", "password_file"):
            raise TargetInUse(
                f"--replica-of for MariaDB: {word!r} is not host=, port=, user=, password= or password_file="
            )
        parts[key] = value
    if "host" not in parts or "user" not in parts:
        raise TargetInUse("--replica-of for MariaDB needs at least host=... and user=...")
    if "password_file" in parts:
        with open(parts.pop("password_file")) as f:
            parts["password"] = f.readline().rstrip("\n")
    if not parts.get("port", "3306").isdigit():
        raise TargetInUse(f"--replica-of for MariaDB: port={parts['port']} is not a number")
    return parts


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def binlog_options(metadata: dict, target: str) -> list[str]:
    """Binary logging as at the backup, so InnoDB crash recovery can settle prepared transactions.

    A transaction prepared in InnoDB but not yet committed at the snapshot is committed if it
    reached the binary log and rolled back if not; without the binary log the server refuses to
    start. Logs outside the data directory are not in the restore: such transactions are rolled
    back (they had not committed when the read lock was taken).
    """
    basename, datadir = metadata.get("binlog_basename") or "", (metadata.get("datadir") or "").rstrip("/")
    if not metadata.get("log_bin"):
        return []
    if datadir and basename.startswith(datadir + "/"):
        return [f"--log-bin={os.path.join(target, basename[len(datadir) + 1 :])}", "--server-id=1"]
    return ["--tc-heuristic-recover=ROLLBACK"]
