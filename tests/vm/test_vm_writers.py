"""Application-aware backup inside the test VM: writers run in the guest through qemu-guest-agent.

GuestRunner against the real guest (argument vectors passed literally, relay sessions, their
cleanup), then PostgreSQL 15 in the guest through `surepoint backup --job` with `vm = NAME`: an
application-consistent backup under a write load that restores with every committed row, WAL
archive pruning after the commit, a job killed before its commit, and the fallback policies with
PostgreSQL stopped.

The CLI opens its own QMP and guest-agent connections, and each of those QEMU sockets takes one
client at a time: the tests hold no connection while the CLI runs (TestVm.run, short `with` blocks).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.consistency.guest_runner import GuestRunner
from surepoint.consistency.postgresql import PostgresWriter
from surepoint.consistency.runner import CommandFailed
from tests.conftest import Cli
from tests.consistency.helpers import events, find_event, utc_timestamp

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_surepoint_bitmaps")]

PG_SERVICE = "postgresql@15-main"
PG_SOCKET_DIR = "/var/run/postgresql"
PG_DATA = "/var/lib/postgresql/15/main"  # on the root disk
ARCHIVE = "/data/wal_archive"  # on the data disk
LOAD_SCRIPT = "/run/pgload.pl"
LOAD_OUT = "/run/pgload.out"
LOAD_STOP = "/run/pgload.stop"
HOST_PG_BIN = Path("/usr/lib/postgresql/15/bin")
WAL_NAME = re.compile(r"^[0-9A-F]{24}$")

# In the guest: one psql session (as postgres) fed one INSERT at a time; each row's id is logged with
# the guest time at which its COMMIT had returned, for at most SECONDS seconds or until STOP exists.
LOAD = r"""
use strict; use warnings; use IPC::Open2; use IO::Handle; use Time::HiRes qw(time);
my ($out, $stop, $seconds) = @ARGV;
open(my $log, ">>", $out) or die "open $out: $!";
$log->autoflush(1);
my $pid = open2(my $from, my $to, "runuser", "-u", "postgres", "--",
    "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "app");
$to->autoflush(1);
my $end = time() + $seconds;
while (time() < $end && ! -e $stop) {
    print $to "INSERT INTO load(v) VALUES ('load') RETURNING id;\n";
    my $line = <$from>;
    last unless defined $line;
    chomp $line;
    printf $log "%s %.6f\n", $line, time();
}
close $to;
waitpid($pid, 0);
print $log "end\n";
"""


# -- guest helpers ------------------------------------------------------------------------------


def psql(test_vm, *statements: str, db: str = "app", timeout: float = 120) -> str:
    """Run statements in the guest's cluster as postgres (each its own -c: ALTER SYSTEM needs that)."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db]
    for sql in statements:
        argv += ["-c", sql]
    return test_vm.run(argv, timeout=timeout).decode()


def archived(test_vm) -> set[str]:
    """The WAL segments in the guest's archive."""
    return {n for n in test_vm.run(["ls", "-1", ARCHIVE]).decode().split() if WAL_NAME.match(n)}


FIND_RELAYS = ["find", "/run", "-mindepth", "1", "-maxdepth", "1", "-name", "surepoint-*"]


def relay_dirs(test_vm) -> list[str]:
    """Session relay directories in the guest (/run/surepoint-*)."""
    with test_vm.agent() as ga:  # find says 1 when a directory goes while it looks: still a list
        return sorted(ga.exec(FIND_RELAYS).stdout.decode().split())


def surepoint_sessions(test_vm) -> list[str]:
    """Server sessions of surepoint's psql (application_name surepoint) other than this query's."""
    out = psql(
        test_vm,
        "SELECT pid, state, query FROM pg_stat_activity "
        "WHERE application_name = 'surepoint' AND pid <> pg_backend_pid()",
        db="postgres",
    )
    return [line for line in out.splitlines() if line.strip()]


def fsfreeze_status(test_vm) -> str:
    with test_vm.agent() as ga:
        return ga.fsfreeze_status()


def clock_offset(test_vm) -> tuple[float, float]:
    """Guest clock minus host clock (seconds), and how far off that may be (half the round trip)."""
    with test_vm.agent() as ga:
        before = time.time()
        guest = ga.execute("guest-get-time") / 1e9
        after = time.time()
    return guest - (before + after) / 2, (after - before) / 2


def write_job(path: Path, vm: str, *, fallback: str, logs: str = "truncate") -> Path:
    path.write_text(
        f'vm = "{vm}"\n'
        f'fallback = "{fallback}"\n'
        f'logs = "{logs}"\n'
        "freeze_timeout = 30\n\n"
        "[[writers]]\n"
        'type = "postgresql"\n'
        'os_user = "postgres"\n'
        f'host = "{PG_SOCKET_DIR}"\n'
        'dbname = "app"\n'
        f'wal_archive = "{ARCHIVE}"\n'
    )
    return path


def pruned_in(message: str) -> set[str]:
    """The WAL segments a prune-logs event lists (the 'kept from' one excluded)."""
    return set(re.findall(r"\b[0-9A-F]{24}\b", message.split("; kept from")[0]))


class GuestLoad:
    """The LOAD script running in the guest; read back through the agent (never held open)."""

    def __init__(self, test_vm) -> None:
        self.vm = test_vm

    def start(self, seconds: int = 300) -> None:
        with self.vm.agent() as ga:
            ga.write_file(LOAD_SCRIPT, LOAD.encode())
            ga.exec(["rm", "-f", LOAD_OUT, LOAD_STOP], check=True)
            ga.exec_start(["perl", LOAD_SCRIPT, LOAD_OUT, LOAD_STOP, str(seconds)], capture=False)

    def lines(self) -> list[str]:
        with self.vm.agent() as ga:
            result = ga.exec(["cat", LOAD_OUT])
        return result.stdout.decode().splitlines() if result.ok else []

    def commits(self) -> list[tuple[int, float]]:
        """(row id, guest time when its COMMIT had returned), in order."""
        return [(int(a), float(b)) for a, b in (line.split() for line in self.lines() if line != "end")]

    def count(self) -> int:
        return len(self.commits())

    def wait_for(self, rows: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < rows:
            assert "end" not in self.lines(), "the load ended early: " + "\n".join(self.lines()[-5:])
            assert time.monotonic() < deadline, f"fewer than {rows} rows after {timeout} s"
            time.sleep(0.5)

    def stop(self, timeout: float = 60) -> None:
        with contextlib.suppress(Exception):
            self.vm.run(["touch", LOAD_STOP])
        deadline = time.monotonic() + timeout
        while "end" not in self.lines() and time.monotonic() < deadline:
            time.sleep(0.5)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_pg(test_vm) -> Iterator[None]:
    """The guest's PostgreSQL 15 cluster running, archiving WAL to ARCHIVE (data disk), with database
    app and table load, and a few archived segments; stopped again after the module."""
    started = time.monotonic()
    test_vm.run(["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", ARCHIVE])
    test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)
    psql(
        test_vm,
        "ALTER SYSTEM SET archive_mode = 'on'",
        # copied under a temporary name and renamed: a copy cut short (a full disk) never looks archived
        f"ALTER SYSTEM SET archive_command = "
        f"'test ! -f {ARCHIVE}/%f && cp %p {ARCHIVE}/%f.part && mv {ARCHIVE}/%f.part {ARCHIVE}/%f'",
        db="postgres",
    )
    test_vm.run(["systemctl", "restart", PG_SERVICE], timeout=180)
    assert psql(test_vm, "SHOW archive_mode", db="postgres").strip() == "on"
    if not psql(test_vm, "SELECT 1 FROM pg_database WHERE datname = 'app'", db="postgres").strip():
        psql(test_vm, "CREATE DATABASE app", db="postgres")
    psql(test_vm, "CREATE TABLE IF NOT EXISTS load (id bigserial PRIMARY KEY, v text NOT NULL)")
    switch_wal(test_vm, 4)
    print(f"\nPostgreSQL in the guest running and archiving after {time.monotonic() - started:.1f} s")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            test_vm.run(["touch", LOAD_STOP])
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "stop", PG_SERVICE], timeout=180)


def switch_wal(test_vm, times: int) -> None:
    """Fill and switch `times` WAL segments and wait until the last is archived."""
    statements = []
    for _ in range(times):
        statements += ["INSERT INTO load(v) VALUES ('seed')", "SELECT pg_walfile_name(pg_switch_wal())"]
    last = psql(test_vm, *statements).split()[-1]
    deadline = time.monotonic() + 60
    while last not in archived(test_vm):
        assert time.monotonic() < deadline, f"{last} not archived: {psql(test_vm, 'SELECT * FROM pg_stat_archiver')}"
        time.sleep(0.5)


needs_host_pg = pytest.mark.skipif(
    not all((HOST_PG_BIN / t).exists() for t in ("pg_ctl", "pg_controldata", "pg_amcheck")),
    reason="the restore check runs the host's PostgreSQL 15 (package postgresql-15) on the restored data directory",
)


@pytest.fixture()
def host_work() -> Iterator[Path]:
    """A work folder the postgres user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="surepoint-vmpg-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- 1. GuestRunner -----------------------------------------------------------------------------


def test_guest_runner_in_the_real_guest(test_vm) -> None:
    """Commands and sessions through the guest agent: argv passed literally, requests echoed, cleaned up."""
    odd = ["a b", "it's", '"double"', "$(touch /run/sp-pwned)", "`id`", "*", "two\nlines", "; rm -rf /x", "\\", ""]
    name = "/run/sp file 'with' \"quotes\" $HOME & spaces.txt"
    with test_vm.agent(timeout=60) as ga:
        runner = GuestRunner(ga, test_vm.name)

        def relays() -> list[str]:  # (the agent takes one connection at a time: this one)
            return sorted(runner.run(FIND_RELAYS).stdout.split())  # (status 1 if one goes meanwhile)

        assert runner.run(["id", "-u"]).check().stdout == "0\n"
        printed = runner.run(["printf", "%s\\0", *odd]).check().stdout
        assert printed.split("\0")[:-1] == odd
        assert not runner.exists("/run/sp-pwned")

        # a session: its client's argv (a file name with quotes and spaces) and each request reach it as they are
        ga.write_file(name, b"from the file\n")
        session = runner.open_session(["cat", "--", name, "-"])
        assert session.dir.startswith("/run/surepoint-")
        assert runner.run(["stat", "-c", "%a %U", session.dir]).check().stdout.split() == ["700", "root"]
        assert session.request("hello $HOME 'x'\n__m1__\n", "__m1__", 30) == "from the file\nhello $HOME 'x'\n"
        assert session.request("second\n__m2__\n", "__m2__", 30) == "second\n"
        assert session.close() == 0
        assert relays() == []

        sqlite = runner.open_session(["sqlite3", "-batch", ":memory:"])
        answer = sqlite.request(
            "CREATE TABLE t(x); INSERT INTO t VALUES ('it''s; $(x)');\nSELECT x, length(x) FROM t;\n.print __m3__\n",
            "__m3__",
            30,
        )
        assert answer == "it's; $(x)|10\n"
        assert sqlite.request("SELECT 6 * 7;\n.print __m4__\n", "__m4__", 30) == "42\n"
        assert sqlite.close() == 0
        assert relays() == []

        # a client that ends by itself: the request fails with what it said, close still cleans up
        ending = runner.open_session(["sh", "-c", 'read line; echo "said: $line"; exit 3'])
        with pytest.raises(CommandFailed, match="sh session in the guest ended: said: bye"):
            ending.request("bye\n", "never printed", 30)
        assert ending.close() == 3
        assert relays() == []

        # a job that dies leaves its session: the next runner's first session ends it and removes its directory
        abandoned = runner.open_session(["cat"])
        assert abandoned.request("x\n__m5__\n", "__m5__", 30) == "x\n"
        fresh = GuestRunner(ga, test_vm.name)
        assert fresh.sweep_stale_sessions() == [abandoned.dir]
        assert relays() == []
        assert runner.run(["pgrep", "-x", "cat"]).returncode == 1

        # and with no next job, the relay's lease runs out: it ends its client and removes its directory
        short = GuestRunner(ga, test_vm.name, session_lease=2)
        leased = short.open_session(["cat"])
        assert leased.request("y\n__m6__\n", "__m6__", 30) == "y\n"
        deadline = time.monotonic() + 60
        while relays():
            assert time.monotonic() < deadline, relays()
            time.sleep(0.5)
        assert runner.run(["pgrep", "-x", "cat"]).returncode == 1
        leased.close()
        runner.run(["rm", "-f", "--", name]).check()


# -- 2. PostgreSQL under load -------------------------------------------------------------------


@needs_host_pg
def test_postgresql_in_the_guest_under_load(test_vm, guest_pg, cli: Cli, tmp_path: Path, host_work: Path) -> None:
    """Application-consistent backup while rows are inserted in the guest; the archive is pruned after the
    commit; the restored cluster recovers with every row committed before the freeze."""
    cli.run("init", check=True)
    job = write_job(tmp_path / "job.toml", test_vm.name, fallback="require", logs="truncate")
    archived_before = archived(test_vm)
    offsets = [clock_offset(test_vm)]
    load = GuestLoad(test_vm)
    load.start(seconds=600)
    try:
        load.wait_for(100)
        rows_before_backup = load.count()
        started = time.monotonic()
        result = cli.run("backup", "--job", str(job), "--json", timeout=900)
        backup_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        point = result.json()
        load.wait_for(load.count() + 30)  # the load goes on after the thaw
    finally:
        load.stop()
    offsets.append(clock_offset(test_vm))
    commits = load.commits()
    assert point["consistency"] == "application", point
    assert point["metadata"]["log_mode"] == "truncate"
    assert point["metadata"]["consistency_failures"] == []

    pg = point["metadata"]["writers"]["postgresql"]
    assert pg["data_directory"] == PG_DATA and pg["archive_mode"] == "on"
    start = pg["start_wal_file"]
    assert WAL_NAME.match(start), pg
    assert f"(file {start})" in pg["backup_label"] and "LABEL: surepoint" in pg["backup_label"], pg["backup_label"]
    assert "CHECKPOINT LOCATION:" in pg["backup_label"] and re.match(r"^[0-9A-F]+/[0-9A-F]+$", pg["stop_lsn"])

    evs = events(cli, point["id"])
    for component, phase in [
        ("postgresql", "identify"),
        ("postgresql", "prepare"),
        ("guest-fsfreeze", "freeze"),
        ("guest-fsfreeze", "thaw"),
        ("postgresql", "post-snapshot"),
        ("job", "commit"),
        ("postgresql", "backup-complete"),
        ("postgresql", "prune-logs"),
        ("job", "finish"),
    ]:
        find_event(evs, component, phase, "ok")
    order = [(e["component"], e["phase"]) for e in evs]
    assert order.index(("job", "commit")) < order.index(("postgresql", "prune-logs"))

    # logs = truncate: archived WAL older than the backup's start segment is gone, the rest kept
    expected = {s for s in archived_before if s < start}
    assert expected, f"no archived segment older than {start}: {sorted(archived_before)}"
    archived_after = archived(test_vm)
    assert not archived_after & expected
    assert start in archived_after and all(s >= start for s in archived_after), sorted(archived_after)
    prune = find_event(evs, "postgresql", "prune-logs", "ok")
    listed = pruned_in(prune["message"])
    assert expected <= listed and all(s < start for s in listed), prune["message"]
    assert prune["message"].startswith(f"pruned {len(listed)}:") and prune["message"].endswith(f"kept from {start}")

    # every row whose COMMIT had returned in the guest before the freeze (guest clock, turned into host
    # time with the measured offset, minus its uncertainty) must be in the restored cluster
    frozen_at = utc_timestamp(find_event(evs, "guest-fsfreeze", "freeze", "ok")["time"])
    low = min(o - err for o, err in offsets)  # guest time - low >= the host time of a commit
    before_freeze = {row for row, at in commits if at - low < frozen_at}
    assert len(before_freeze) >= rows_before_backup >= 100

    found, restore_seconds = restored_rows(cli, point, host_work)
    missing = sorted(before_freeze - found)
    print(
        f"\n[postgresql in the guest] rows committed before the backup started: {rows_before_backup}; "
        f"before the freeze: {len(before_freeze)} (highest id {max(before_freeze)}); "
        f"rows after restore: {len(found)} (highest id {max(found)}); missing: {len(missing)}; "
        f"committed in all: {len(commits)}; backup {backup_seconds:.1f} s, frozen "
        f"{point['metadata']['freeze_seconds']:.3f} s, restore and recovery {restore_seconds:.1f} s; "
        f"pruned {len(listed)} WAL segment(s) below {start}; guest clock offset {offsets[0][0]:+.3f} s"
    )
    assert not missing, f"committed before the freeze but missing after restore: {missing[:20]}"
    assert len(found) >= rows_before_backup
    # the image is the frozen instant, not the disk as it was when the backup finished reading it
    assert max(found) < max(row for row, _ in commits)


def restored_rows(cli: Cli, point: dict, work: Path) -> tuple[set[int], float]:
    """Restore the root disk (PostgreSQL's data directory), start PostgreSQL on it here (the host's 15,
    another port, no archiving): it recovers as after a power cut. The ids in table load."""
    started = time.monotonic()
    root = next(d["number"] for d in point["disks"] if d["name"] == "root")
    image = work / "root.raw"
    cli.run("restore", point["id"], "--disk", str(root), "--to", str(image), check=True, timeout=600)
    mount = work / "mnt"
    mount.mkdir()
    sockets = work / "sock"
    sockets.mkdir()
    shutil.chown(sockets, "postgres")
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, capture_output=True)
    datadir = mount / PG_DATA.lstrip("/")
    port = free_port()
    pg_ctl = ["runuser", "-u", "postgres", "--", str(HOST_PG_BIN / "pg_ctl"), "-D", str(datadir)]
    try:
        control = subprocess.run([HOST_PG_BIN / "pg_controldata", datadir], capture_output=True, text=True).stdout
        # the snapshot is of a running server: PostgreSQL must recover, as after a power cut
        assert "Database cluster state:               in production" in control, control
        # Debian keeps the configuration in /etc: the copy gets a minimal one of its own
        (datadir / "postgresql.conf").write_text("listen_addresses = ''\n")
        (datadir / "pg_hba.conf").write_text("local all all trust\n")
        (datadir / "pg_ident.conf").write_text("")
        (datadir / "postmaster.pid").unlink(missing_ok=True)
        subprocess.run(["chown", "-R", "postgres:", str(datadir)], check=True)
        options = f"-c port={port} -c unix_socket_directories={sockets} -c archive_mode=off"
        start = subprocess.run(
            [*pg_ctl, "-l", str(sockets / "server.log"), "-w", "-t", "180", "-o", options, "start"],
            capture_output=True,
            text=True,
        )
        log = (sockets / "server.log").read_text() if (sockets / "server.log").exists() else ""
        assert start.returncode == 0, start.stdout + start.stderr + log
        assert "database system is ready to accept connections" in log, log
        client = ["runuser", "-u", "postgres", "--", "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
        client += ["-h", str(sockets), "-p", str(port), "-d", "app"]
        count = subprocess.run([*client, "-c", "SELECT count(*) FROM load"], capture_output=True, text=True)
        assert count.returncode == 0, count.stderr
        ids = subprocess.run([*client, "-c", "SELECT id FROM load"], capture_output=True, text=True, check=True)
        found = {int(x) for x in ids.stdout.split()}
        assert int(count.stdout) == len(found)
        subprocess.run([*client, "-c", "CREATE EXTENSION amcheck"], capture_output=True, check=True)
        amcheck = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(HOST_PG_BIN / "pg_amcheck"), "-h", str(sockets), "-p", str(port),
             "-d", "app", "--heapallindexed"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
        return found, time.monotonic() - started
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        subprocess.run(["umount", str(mount)], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 3. killed before the commit ----------------------------------------------------------------


def test_killed_before_commit_leaves_the_guest_and_the_archive_alone(
    test_vm, guest_pg, cli: Cli, tmp_path: Path
) -> None:
    """A backup killed after the snapshot, before its commit: no restore point, no WAL pruned, the guest
    thawed; the next job ends the dead job's psql session and runs normally."""
    cli.run("init", check=True)
    job = write_job(tmp_path / "job.toml", test_vm.name, fallback="require", logs="truncate")
    switch_wal(test_vm, 2)  # something a prune would remove
    archived_before = archived(test_vm)

    killed = cli.run("backup", "--job", str(job), env={"SUREPOINT_FAULT": "before-commit"}, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cli.points() == []
    assert archived_before <= archived(test_vm)
    evs = events(cli)
    find_event(evs, "guest-fsfreeze", "thaw", "ok")  # it was killed after the snapshot
    find_event(evs, "postgresql", "post-snapshot", "ok")  # pg_backup_stop ran before the kill
    assert not [e for e in evs if e["phase"] in ("commit", "backup-complete", "prune-logs")], evs
    assert fsfreeze_status(test_vm) == "thawed"
    # the dead job's psql is still connected (idle, its backup already stopped) until the next job ends it
    left_sessions, left_dirs = surepoint_sessions(test_vm), relay_dirs(test_vm)
    assert len(left_dirs) == 1 and len(left_sessions) == 1 and "pg_backup_stop" in left_sessions[0], left_sessions

    # A job that dies while it holds a backup open (pg_backup_start done): simulated in this process, which
    # then drops its connection the way a killed one does. Its first session ends the killed job's.
    with test_vm.agent(timeout=60) as ga:
        writer = PostgresWriter(
            GuestRunner(ga, test_vm.name),
            {"os_user": "postgres", "host": PG_SOCKET_DIR, "dbname": "app", "wal_archive": ARCHIVE},
        )
        writer.identify()
        writer.prepare()
    holding = surepoint_sessions(test_vm)
    assert len(holding) == 1 and "pg_backup_start" in holding[0], holding
    assert relay_dirs(test_vm) != left_dirs
    print(f"\n[killed before commit] left by the killed job: {left_sessions}; by the one killed in backup: {holding}")

    # the next job ends that one too (PostgreSQL aborts the backup with the session), and runs normally
    result = cli.run("backup", "--job", str(job), "--json", timeout=900)
    assert result.returncode == 0, result.stderr
    point = result.json()
    assert point["consistency"] == "application"
    assert [p["id"] for p in cli.points()] == [point["id"]]
    assert surepoint_sessions(test_vm) == []
    assert relay_dirs(test_vm) == []
    find_event(events(cli, point["id"]), "job", "cleanup", "warning")  # the dead job's view, taken down
    start = point["metadata"]["writers"]["postgresql"]["start_wal_file"]
    after = archived(test_vm)
    assert not {s for s in archived_before if s < start} & after
    assert all(s >= start for s in after), sorted(after)
    assert fsfreeze_status(test_vm) == "thawed"


# -- 4. fallback with PostgreSQL stopped --------------------------------------------------------


def test_postgresql_stopped_require_fails_try_gives_filesystem(test_vm, guest_pg, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    switch_wal(test_vm, 1)
    test_vm.run(["systemctl", "stop", PG_SERVICE], timeout=180)
    # taken after the stop: a shutting-down server may still archive its last segment
    archived_before = archived(test_vm)
    try:
        # require: the job fails before any data is read, with the writer's error on one line
        job = write_job(tmp_path / "require.toml", test_vm.name, fallback="require")
        started = time.monotonic()
        failed = cli.run("backup", "--job", str(job), "--json", timeout=600)
        fail_seconds = time.monotonic() - started
        assert failed.returncode != 0, failed.stdout
        lines = failed.stderr.strip().splitlines()
        error = lines[-1]
        assert error.startswith("error: ") and "require" in error, failed.stderr
        assert "postgresql identify: cannot connect to PostgreSQL: psql session in the guest ended" in error, error
        assert ".s.PGSQL.5432" in error, error
        assert cli.points() == []
        assert archived(test_vm) == archived_before
        evs = events(cli)
        find_event(evs, "postgresql", "identify", "failed")
        find_event(evs, "job", "finish", "failed")
        assert not [e for e in evs if e["phase"] in ("snapshot", "freeze", "prune-logs")], evs
        assert relay_dirs(test_vm) == []
        assert fsfreeze_status(test_vm) == "thawed"

        # try: filesystem-consistent, with a warning naming the failure; nothing pruned
        job = write_job(tmp_path / "try.toml", test_vm.name, fallback="try")
        result = cli.run("backup", "--job", str(job), "--json", timeout=900)
        assert result.returncode == 0, result.stderr
        point = result.json()
        assert point["consistency"] == "filesystem"
        assert "filesystem-consistent only" in result.stderr and "postgresql identify" in result.stderr
        assert [p["consistency"] for p in cli.points()] == ["filesystem"]
        assert archived(test_vm) == archived_before
        evs = events(cli, point["id"])
        find_event(evs, "postgresql", "identify", "failed")
        find_event(evs, "guest-fsfreeze", "freeze", "ok")
        find_event(evs, "postgresql", "prune-logs", "skipped")
        find_event(evs, "job", "finish", "warning")
        assert relay_dirs(test_vm) == []
        print(f"\n[postgresql stopped] require failed in {fail_seconds:.1f} s: {error}")
    finally:
        test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)
    assert psql(test_vm, "SELECT 1", db="postgres").strip() == "1"
