"""`restore-app ... --vm NAME`: PostgreSQL and MariaDB restored inside the running test guest.

One VM backup with both writers (PostgreSQL archiving its WAL in the guest); rows are added after
it; each application is restored in place through the guest agent (service stopped, data directory
copied in through a hot-plugged port, stale pid files removed, service started, checked): the later
rows are gone, the earlier ones are there, the service answers, and the phases are events of the
restore point in order. PostgreSQL's WAL is shipped from inside the guest (`logs ship` of the VM
job) and a point in time between two single-row commits is restored in the guest: exactly the rows
committed before it. Then the refusals: a VM without a guest agent, a time before the first restore
point or after the last shipped log, a writer without shipped logs, a PostgreSQL major version the
guest does not have.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.consistency.guest_runner import GuestRunner
from surepoint.consistency.restore import RestoreRequest
from surepoint.consistency.restore_guest import GuestPostgresRestore
from surepoint.consistency.runner import CommandFailed
from tests.conftest import Cli
from tests.consistency.helpers import events

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.usefixtures("no_surepoint_bitmaps")]

PG_SERVICE = "postgresql@15-main"
PG_DATA = "/var/lib/postgresql/15/main"
MARIA_DATA = "/var/lib/mysql"
DB = "sprestore"
BEFORE, AFTER = 120, 45
ARCHIVE = "/data/sprestore_wal"  # on the data disk
TIMED = 60  # single-row commits after the backup, for the point in time
SQLITE_DB = "/data/sprestore.db"


def psql(test_vm, sql: str, db: str = DB) -> str:
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db]
    return test_vm.run([*argv, "-c", sql], timeout=120).decode().strip()


def maria(test_vm, sql: str) -> str:
    return test_vm.run(["mariadb", "--batch", "--skip-column-names", "-e", sql], timeout=120).decode().strip()


def sqlite(test_vm, sql: str) -> str:
    return test_vm.run(["sqlite3", "-batch", SQLITE_DB, sql], timeout=120).decode().strip()


def inserts(first: int, last: int) -> str:
    return (
        f"WITH RECURSIVE g(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM g WHERE n < {last}) "
        "INSERT INTO t SELECT n, 'x' FROM g;"
    )


def write_job(path: Path, vm: str, mariadb: bool = True) -> Path:
    path.write_text(
        f'vm = "{vm}"\nfallback = "require"\nlogs = "keep"\nfreeze_timeout = 30\n\n'
        '[[writers]]\ntype = "postgresql"\nos_user = "postgres"\nhost = "/var/run/postgresql"\n'
        f'wal_archive = "{ARCHIVE}"\n\n'
        + (
            '[[writers]]\ntype = "mariadb"\nsocket = "/run/mysqld/mysqld.sock"\nuser = "root"\n\n'
            f'[[writers]]\ntype = "sqlite"\ndatabases = ["{SQLITE_DB}"]\n'
            if mariadb
            else ""
        )
    )
    return path


def archived(test_vm) -> list[str]:
    return sorted(test_vm.run(["ls", "-1", ARCHIVE]).decode().split())


def active(test_vm, unit: str) -> bool:
    with test_vm.agent() as ga:
        return ga.exec(["systemctl", "is-active", "--quiet", unit]).ok


@pytest.fixture(scope="module")
def restore_cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("app-restore"))
    cli.run("init", "--encryption", "none", check=True)
    return cli


@pytest.fixture(scope="module")
def point(test_vm, restore_cli: Cli, tmp_path_factory) -> Iterator[str]:
    """A VM restore point holding BEFORE rows in PostgreSQL and in MariaDB; AFTER more rows added after it."""
    was = {unit: active(test_vm, unit) for unit in (PG_SERVICE, "mariadb")}
    test_vm.run(["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", ARCHIVE])
    test_vm.run(["systemctl", "start", PG_SERVICE, "mariadb"], timeout=180)
    psql(test_vm, "ALTER SYSTEM SET archive_mode = 'on'", db="postgres")
    psql(
        test_vm,
        f"ALTER SYSTEM SET archive_command = 'cp %p {ARCHIVE}/%f.part && mv {ARCHIVE}/%f.part {ARCHIVE}/%f'",
        db="postgres",
    )
    test_vm.run(["systemctl", "restart", PG_SERVICE], timeout=180)
    psql(test_vm, f"DROP DATABASE IF EXISTS {DB}", db="postgres")
    psql(test_vm, f"CREATE DATABASE {DB}", db="postgres")
    psql(test_vm, "CREATE TABLE t (id int PRIMARY KEY, v text, ts timestamptz NOT NULL DEFAULT clock_timestamp())")
    psql(test_vm, f"INSERT INTO t SELECT g, 'a' FROM generate_series(1, {BEFORE}) g")
    maria(test_vm, f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB}")
    maria(test_vm, f"CREATE TABLE {DB}.t (id int PRIMARY KEY, v text) ENGINE=InnoDB")
    maria(test_vm, f"INSERT INTO {DB}.t SELECT seq, 'a' FROM {DB}.seq_1_to_{BEFORE}")
    sqlite(test_vm, f"CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); {inserts(1, BEFORE)}")
    job = write_job(tmp_path_factory.mktemp("app-restore-job") / "job.toml", test_vm.name)
    backup = restore_cli.run("backup", "--job", str(job), "--json", check=True, timeout=900).json()
    backed_up = time.time()
    psql(test_vm, f"INSERT INTO t SELECT g, 'b' FROM generate_series({BEFORE + 1}, {BEFORE + AFTER}) g")
    maria(test_vm, f"INSERT INTO {DB}.t SELECT seq, 'b' FROM {DB}.seq_{BEFORE + 1}_to_{BEFORE + AFTER}")
    sqlite(test_vm, inserts(BEFORE + 1, BEFORE + AFTER))
    try:
        yield backup["id"], backed_up, job
    finally:
        with contextlib.suppress(Exception):
            psql(test_vm, "ALTER SYSTEM RESET archive_mode", db="postgres")
            psql(test_vm, "ALTER SYSTEM RESET archive_command", db="postgres")
            test_vm.run(["rm", "-rf", ARCHIVE])
        with contextlib.suppress(Exception):  # the old data directories the restores moved aside (sic)
            test_vm.run(["sh", "-c", f"rm -rf {PG_DATA}.before-restore-* {MARIA_DATA}.before-restore-*"], timeout=120)
        with contextlib.suppress(Exception):
            test_vm.run(["sh", "-c", f"rm -f {SQLITE_DB}*"])
        with contextlib.suppress(Exception):
            psql(test_vm, f"DROP DATABASE IF EXISTS {DB}", db="postgres")
            maria(test_vm, f"DROP DATABASE IF EXISTS {DB}")
        for unit, running in was.items():
            if not running:
                with contextlib.suppress(Exception):
                    test_vm.run(["systemctl", "stop", unit], timeout=180)


def phases(cli: Cli, point: str, writer: str) -> list[tuple[str, str, str]]:
    evs = sorted(events(cli, point), key=lambda e: (e["time"], e.get("id", 0)))
    return [(e["component"], e["phase"], e["outcome"]) for e in evs if e["component"] in ("restore-app", writer)
            and e["phase"] in ("start", "pre-restore", "restore", "post-restore", "finish")]  # fmt: skip


def test_postgresql_point_in_time_inside_the_vm(test_vm, restore_cli: Cli, point) -> None:
    point_id, backed_up, job = point
    # the guest's clock decides the commit times: it must be past the restore point's (host) time
    deadline = time.monotonic() + 60
    while float(test_vm.run(["date", "+%s.%N"]).decode()) < backed_up + 1:
        assert time.monotonic() < deadline, "the guest's clock lags the host's by more than a minute"
        time.sleep(0.5)
    first = BEFORE + AFTER + 1
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", DB]
    for n in range(first, first + TIMED):  # each -c its own transaction: one commit per row
        argv += ["-c", f"INSERT INTO t (id, v) VALUES ({n}, 'timed')"]
    test_vm.run(argv, timeout=300)
    cut = first + TIMED // 2
    # row `cut` was inserted at `at` and committed after it; every earlier row committed before it
    at = psql(test_vm, f"SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM t WHERE id = {cut}")
    last = psql(test_vm, "SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + 60
    while last not in archived(test_vm):
        assert time.monotonic() < deadline, f"{last} was not archived"
        time.sleep(0.5)
    before_ship = archived(test_vm)
    started = time.monotonic()
    wal_job = write_job(job.with_name("wal-job.toml"), test_vm.name, mariadb=False)  # the guest's MariaDB has no binlog
    shipped = restore_cli.run("logs", "ship", "--job", str(wal_job), "--json", timeout=600)
    ship_seconds = time.monotonic() - started
    assert shipped.returncode == 0, shipped.stderr
    (report,) = [r for r in shipped.json() if r["writer"] == "postgresql"]
    assert set(report["shipped"]) == set(before_ship) and set(report["removed_on_server"]) == set(before_ship)
    assert not set(archived(test_vm)) & set(before_ship), "shipped WAL is still in the guest's archive"
    listed = restore_cli.run("logs", "list", "postgresql", test_vm.name, "--json", check=True).json()
    # stored, but for the WAL older than the restore point, which no point needs (retention)
    assert {r["file"] for r in listed} == set(before_ship) - set(report["forgotten"])
    assert all(f < min(r["file"] for r in listed) for f in report["forgotten"])

    started = time.monotonic()
    result = restore_cli.run(
        "restore-app", "postgresql", test_vm.name, "--vm", test_vm.name, "--at", f"{at}+00:00", "--overwrite",
        "--json", timeout=900,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    print(f"\nWAL shipped from the guest in {ship_seconds:.1f} s ({len(before_ship)} files); point in time restored "
          f"in the guest in {took:.1f} s, {len(result.json()['logs_replayed'])} WAL files replayed")  # fmt: skip
    found = psql(test_vm, "SELECT count(*), max(id) FROM t")
    assert found == f"{cut - 1}|{cut - 1}", f"expected every row before {cut} and none after, found {found}"
    assert active(test_vm, PG_SERVICE)
    report = result.json()
    print(f"phases: {report['phases']}")
    assert report["target"] == PG_DATA and report["details"]["timeline"] > 1  # promoted to a new timeline
    assert [t["transport"] for t in report["details"]["transfer"]] == ["channel", "channel"]  # data, then WAL
    assert phases(restore_cli, point_id, "postgresql")[-5:] == [
        ("restore-app", "start", "ok"),
        ("postgresql", "pre-restore", "ok"),
        ("postgresql", "restore", "ok"),
        ("postgresql", "post-restore", "ok"),
        ("restore-app", "finish", "ok"),
    ]
    # the old data directory was kept aside, never deleted; the hot-plugged ports are gone again
    assert test_vm.run(["sh", "-c", f"ls -d {PG_DATA}.before-restore-*"]).decode().split()
    with test_vm.qmp() as qmp:
        ports = [d for d in qmp.execute("qom-list", path="/machine/peripheral") if d["name"].startswith("sprestore")]
    assert ports == []

    # refusals: after the last shipped log, a writer whose logs were never shipped
    result = restore_cli.run("restore-app", "postgresql", test_vm.name, "--vm", test_vm.name, "--at",
                             "2099-01-01 00:00:00", "--overwrite")  # fmt: skip
    assert result.returncode == 2 and "after the last shipped log" in result.stderr, result.stderr
    result = restore_cli.run("restore-app", "mariadb", test_vm.name, "--vm", test_vm.name, "--at", f"{at[:19]}+00:00",
                             "--overwrite")  # fmt: skip
    assert result.returncode == 2 and "no logs of" in result.stderr, result.stderr


def test_mariadb_restored_inside_the_vm(test_vm, restore_cli: Cli, point) -> None:
    point = point[0]
    assert maria(test_vm, f"SELECT count(*) FROM {DB}.t") == str(BEFORE + AFTER)
    started = time.monotonic()
    result = restore_cli.run("restore-app", "mariadb", point, "--vm", test_vm.name, "--overwrite", timeout=900)
    assert result.returncode == 0, result.stderr
    print(f"\nMariaDB restored in the guest in {time.monotonic() - started:.1f} s")
    assert maria(test_vm, f"SELECT count(*), min(id), max(id) FROM {DB}.t") == f"{BEFORE}\t1\t{BEFORE}"
    assert active(test_vm, "mariadb")
    assert [p[1] for p in phases(restore_cli, point, "mariadb")[-5:]] == [
        "start", "pre-restore", "restore", "post-restore", "finish"
    ]  # fmt: skip


def test_sqlite_restored_inside_the_vm(test_vm, restore_cli: Cli, point) -> None:
    assert sqlite(test_vm, "SELECT count(*) FROM t") == str(BEFORE + AFTER)
    test_vm.run(["sqlite3", SQLITE_DB, "PRAGMA journal_mode=WAL;", "INSERT INTO t VALUES (100000, 'wal');"])
    result = restore_cli.run("restore-app", "sqlite", point[0], "--vm", test_vm.name, "--overwrite", timeout=600)
    assert result.returncode == 0, result.stderr
    # exactly the rows of the backup, none written after it (in WAL mode since)
    assert sqlite(test_vm, "SELECT count(*), max(id) FROM t") == f"{BEFORE}|{BEFORE}"
    assert sqlite(test_vm, "PRAGMA integrity_check") == "ok"


def test_refusals(test_vm, restore_cli: Cli, point, tmp_path: Path) -> None:
    point = point[0]
    # a target with data and no --overwrite: nothing stopped, nothing touched
    result = restore_cli.run("restore-app", "mariadb", point, "--vm", test_vm.name)
    assert result.returncode == 2 and "--overwrite" in result.stderr, result.stderr
    assert active(test_vm, "mariadb")
    # a time before the first restore point
    result = restore_cli.run(
        "restore-app", "postgresql", test_vm.name, "--vm", test_vm.name, "--at", "2001-01-01 00:00:00"
    )
    assert result.returncode == 2 and "before the first restore point" in result.stderr, result.stderr
    # a VM without a guest agent (a QEMU with a monitor and nothing else)
    qmp_path = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-name", f"sp-noagent-{os.getpid()}", "-machine", "none", "-nodefaults",
         "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = restore_cli.run("restore-app", "postgresql", point, "--vm", f"sp-noagent-{os.getpid()}", "--overwrite")
        assert result.returncode == 2 and "guest-agent" in result.stderr, result.stderr
    finally:
        qemu.kill()
        qemu.wait(10)
    result = restore_cli.run("restore-app", "postgresql", point, "--vm", "no-such-vm", "--overwrite")
    assert result.returncode != 0 and "no VM named" in result.stderr, result.stderr
    # a PostgreSQL major version the guest does not have: refused before anything is stopped
    fake = tmp_path / "point" / "var/lib/postgresql/13/main"
    fake.mkdir(parents=True)
    (fake / "PG_VERSION").write_text("13\n")
    with test_vm.agent() as ga:
        writer = GuestPostgresRestore(GuestRunner(ga, test_vm.name), transfer=None)
        metadata = {"data_directory": "/var/lib/postgresql/13/main"}
        request = RestoreRequest("x", [str(tmp_path / "point")], PG_DATA, metadata)
        with pytest.raises(CommandFailed, match="PostgreSQL 13 cluster and the guest has no PostgreSQL 13"):
            writer.pre_restore(request)
    assert active(test_vm, PG_SERVICE)
