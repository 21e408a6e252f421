"""The lab's checks against the test guest: agent heartbeat, PostgreSQL, MariaDB, SQLite and scripts.

Each database check must pass on healthy data and fail, with the database's own words in its
output, on data damaged on purpose. Everything a test creates in the guest is removed again, and
a database server a test started is stopped again when it was not running before.
The checks open their own guest-agent connections: the tests hold none while a check runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from surepoint.lab.check_spec import parse_check
from surepoint.lab.checks import CheckContext, CheckResult, guest_addresses, run_check

pytestmark = [pytest.mark.kvm]

PG_SERVICE = "postgresql@15-main"
MARIADB_SERVICE = "mariadb"
GARBAGE = bytes(range(0xA0, 0xE0))  # 64 non-zero bytes: an all-zero page would pass as a new, empty one


def run(test_vm, raw: dict) -> CheckResult:
    spec = parse_check(raw, "test")
    return run_check(spec, CheckContext(vm="test-vm", guest_agent=test_vm.qga_path, network_prefix=None, addresses=[]))


def psql(test_vm, sql: str, db: str = "postgres") -> str:
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql]
    return test_vm.run(argv, timeout=120).decode().strip()


def mariadb(test_vm, sql: str) -> str:
    return test_vm.run(["mariadb", "--batch", "--skip-column-names", "-e", sql], timeout=120).decode().strip()


def active(test_vm, unit: str) -> bool:
    with test_vm.agent() as ga:
        return ga.exec(["systemctl", "is-active", "--quiet", unit]).ok


def guest_processes(test_vm, pattern: str) -> str:
    with test_vm.agent() as ga:
        return ga.exec(["pgrep", "-af", pattern]).stdout.decode().strip()


@pytest.fixture(scope="module")
def guest_postgres(test_vm) -> Iterator[None]:
    """PostgreSQL 15 running in the guest; stopped after the module if it was not running before."""
    was_running = active(test_vm, PG_SERVICE)
    test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)
    yield
    if not was_running:
        test_vm.run(["systemctl", "stop", PG_SERVICE], timeout=180)


@pytest.fixture(scope="module")
def guest_mariadb(test_vm) -> Iterator[None]:
    was_running = active(test_vm, MARIADB_SERVICE)
    test_vm.run(["systemctl", "start", MARIADB_SERVICE], timeout=180)
    yield
    if not was_running:
        test_vm.run(["systemctl", "stop", MARIADB_SERVICE], timeout=180)


@pytest.fixture()
def pg_database(test_vm, guest_postgres) -> Iterator[str]:
    """A database `labcheck` with a table of 2000 rows and an index; dropped afterwards."""
    psql(test_vm, "DROP DATABASE IF EXISTS labcheck")
    psql(test_vm, "CREATE DATABASE labcheck")
    try:
        psql(
            test_vm,
            "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);"
            "INSERT INTO items SELECT g, repeat('x', 50) || g FROM generate_series(1, 2000) g;"
            "CHECKPOINT;",
            db="labcheck",
        )
        yield "labcheck"
    finally:
        test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)  # a test may have stopped it
        psql(test_vm, "DROP DATABASE IF EXISTS labcheck")


def test_heartbeat(test_vm) -> None:
    result = run(test_vm, {"type": "heartbeat"})
    assert result.outcome == "passed", result.output
    assert "answers guest-ping and guest-info" in result.output


def test_guest_addresses_leave_out_loopback(test_vm) -> None:
    # an address given to the guest's card shows; lo's 127.0.0.1 is no address to probe
    test_vm.run(["ip", "addr", "add", "192.0.2.77/24", "dev", "lo", "label", "lo:lab"])
    try:
        found = guest_addresses(test_vm.qga_path, timeout=30)
    finally:
        test_vm.run(["ip", "addr", "del", "192.0.2.77/24", "dev", "lo"])
    assert "192.0.2.77" in found and "127.0.0.1" not in found, found
    assert guest_addresses(test_vm.qga_path, timeout=30) == [a for a in found if a != "192.0.2.77"]


def test_postgresql_passes_on_a_healthy_database(test_vm, pg_database: str) -> None:
    result = run(
        test_vm,
        {"type": "postgresql", "database": pg_database, "query": "SELECT count(*) FROM items", "expect": "2000"},
    )
    assert result.outcome == "passed", result.output
    assert "query: 2000" in result.output
    assert f"pg_amcheck --heapallindexed {pg_database}: no corruption found" in result.output
    wrong = run(test_vm, {"type": "postgresql", "database": pg_database, "query": "SELECT 41", "expect": "42"})
    assert wrong.outcome == "failed"
    assert "returned '41', expected '42'" in wrong.output
    broken = run(test_vm, {"type": "postgresql", "database": pg_database, "query": "SELECT * FROM nope"})
    assert broken.outcome == "failed"
    assert 'relation "nope" does not exist' in broken.output


def test_postgresql_fails_on_a_damaged_table(test_vm, pg_database: str) -> None:
    data_dir = psql(test_vm, "SHOW data_directory")
    relation = psql(test_vm, "SELECT pg_relation_filepath('items')", db=pg_database)
    path = f"{data_dir}/{relation}"
    test_vm.run(["systemctl", "stop", PG_SERVICE], timeout=180)

    down = run(test_vm, {"type": "postgresql", "database": pg_database, "timeout": 8})
    assert down.outcome == "failed"
    assert "PostgreSQL did not get ready" in down.output
    assert "the test's 8 s" in down.output
    assert "no response" in down.output  # pg_isready's own words

    with test_vm.agent() as ga:
        handle = ga.file_open(path, "r+b")
        try:
            assert ga.file_write(handle, GARBAGE) == len(GARBAGE)
        finally:
            ga.file_close(handle)
        assert ga.read_file(path)[:64] == GARBAGE
    test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)

    result = run(test_vm, {"type": "postgresql", "database": pg_database})
    assert result.outcome == "failed", result.output
    assert "pg_amcheck found problems" in result.output
    assert "invalid page in block 0" in result.output
    assert relation in result.output


def test_sqlite(test_vm) -> None:
    good, bad = "/tmp/lab-check-good.db", "/tmp/lab-check-bad.db"
    rows = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t (v);" + "".join(
        f"INSERT INTO t (v) VALUES ('{'row' * 40}{i}');" for i in range(400)
    )
    try:
        for path in (good, bad):
            test_vm.run(["sqlite3", path, rows])
        with test_vm.agent() as ga:
            handle = ga.file_open(bad, "r+b")
            try:
                ga.execute("guest-file-seek", {"handle": handle, "offset": 4096 * 3, "whence": "set"})
                ga.file_write(handle, GARBAGE * 4)
            finally:
                ga.file_close(handle)

        query = "-- rows\nSELECT count(*) FROM t;"  # starts like an option: must still be taken as SQL
        result = run(test_vm, {"type": "sqlite", "path": good, "query": query, "expect": "400"})
        assert result.outcome == "passed", result.output
        assert "integrity_check of /tmp/lab-check-good.db: ok" in result.output

        result = run(test_vm, {"type": "sqlite", "path": bad})
        assert result.outcome == "failed", result.output
        assert "PRAGMA integrity_check of /tmp/lab-check-bad.db" in result.output
        assert "Page 4" in result.output or "malformed" in result.output

        result = run(test_vm, {"type": "sqlite", "path": "/tmp/lab-check-missing.db"})
        assert result.outcome == "failed"
        assert "does not exist" in result.output
    finally:
        test_vm.run(["rm", "-f", good, bad])
    with test_vm.agent() as ga:  # the check did not create the missing database
        assert not ga.exec(["test", "-e", "/tmp/lab-check-missing.db"]).ok


def test_mariadb(test_vm, guest_mariadb) -> None:
    mariadb(test_vm, "DROP DATABASE IF EXISTS labcheck")
    try:
        mariadb(
            test_vm,
            "CREATE DATABASE labcheck; USE labcheck;"
            "CREATE TABLE a (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB;"
            "CREATE TABLE b (id INT PRIMARY KEY) ENGINE=Aria;"
            "INSERT INTO a VALUES (1, 'one'), (2, 'two'); INSERT INTO b VALUES (1);",
        )
        result = run(test_vm, {"type": "mariadb", "database": "labcheck", "query": "SELECT v FROM a WHERE id = 2"})
        assert result.outcome == "passed", result.output
        assert "query: two" in result.output
        assert "labcheck.a\tcheck\tstatus\tOK" in result.output
        assert "labcheck.b\tcheck\tstatus\tOK" in result.output
        assert "2 table(s) of labcheck OK" in result.output

        result = run(test_vm, {"type": "mariadb", "database": "labcheck", "tables": ["a", "gone"]})
        assert result.outcome == "failed", result.output
        assert "not OK: labcheck.gone" in result.output
        assert "doesn't exist" in result.output

        result = run(test_vm, {"type": "mariadb", "database": "nosuchdb"})
        assert result.outcome == "failed"
        assert "Unknown database 'nosuchdb'" in result.output
    finally:
        mariadb(test_vm, "DROP DATABASE IF EXISTS labcheck")


def test_guest_script_exit_code_and_output(test_vm) -> None:
    argv = ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"]
    result = run(test_vm, {"type": "script", "argv": argv, "expect_exit": 3})
    assert result.outcome == "passed", result.output
    assert result.output.startswith("exit code 3 (expected 3)")
    assert "to-stdout" in result.output and "to-stderr" in result.output

    result = run(test_vm, {"type": "script", "argv": argv})
    assert result.outcome == "failed"
    assert result.output.startswith("exit code 3 (expected 0)")
    assert "to-stderr" in result.output

    result = run(test_vm, {"type": "script", "argv": ["/usr/local/bin/no-such-script"]})
    assert result.outcome == "error"
    assert "not installed in the guest" in result.output


def test_guest_script_past_its_timeout_is_killed_in_the_guest(test_vm) -> None:
    started = time.monotonic()
    result = run(test_vm, {"type": "script", "argv": ["sh", "-c", "echo started; exec sleep 97"], "timeout": 6})
    assert time.monotonic() - started < 12
    assert result.outcome == "timeout", result.output
    assert "still running" in result.output
    assert "started" in result.output
    deadline = time.monotonic() + 10
    while guest_processes(test_vm, "sleep 97") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert guest_processes(test_vm, "sleep 97") == ""
