"""restore-app: one application out of a restore point, in its own order (pre-restore, restore,
post-restore), into a new directory or in place of the running one; the restored server answers
with exactly the rows of the backup."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from tests.consistency.helpers import PG_BIN, free_port, maria_job, pg_job, sh, write_job

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"),
]

PHASES = ["pre-restore", "restore", "post-restore"]


def restore_events(cli, point: str, component: str) -> list[dict]:
    """The events of the last restore-app run of `point` (the backup's own events come before)."""
    rows = cli.run("events", point, "--json", "--limit", "5000", check=True).json()
    start = max(i for i, e in enumerate(rows) if (e["component"], e["phase"]) == ("restore-app", "start"))
    return [e for e in rows[start:] if e["component"] in (component, "restore-app")]


def assert_phases_in_order(evs: list[dict], component: str) -> None:
    phases = [(e["component"], e["phase"], e["outcome"]) for e in evs]
    assert phases == [
        ("restore-app", "start", "ok"),
        *[(component, p, "ok") for p in PHASES],
        ("restore-app", "finish", "ok"),
    ], phases


def pg_ids(socket_dir, port, db: str = "app") -> set[int]:
    out = sh(["psql", "-X", "-A", "-t", "-h", socket_dir, "-p", port, "-U", "postgres", "-d", db, "-c",
              "SELECT id FROM load"]).stdout  # fmt: skip
    return {int(x) for x in out.split()}


def stop_pg(datadir) -> None:
    sh(["runuser", "-u", "postgres", "--", PG_BIN / "pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop"],
       check=False)  # fmt: skip


def test_postgresql_restore_beside_the_original(work, pg, repo):
    cli = repo
    pg.sql("INSERT INTO load(v) SELECT 'before' FROM generate_series(1, 500)", "app")
    point = cli.run("backup", "--job", str(pg_job(work, pg)), "--json", check=True).json()
    pg.sql("INSERT INTO load(v) SELECT 'after' FROM generate_series(1, 100)", "app")

    target = work.dir / "pg-restored"
    port = free_port()
    work.defer(stop_pg, target)
    result = cli.run("restore-app", "postgresql", "pgdb", "--to", str(target), "--port", str(port),
                     "--socket", str(work.run_dir), "--no-archive", "--json", check=True).json()  # fmt: skip
    assert result["restore_point"] == point["id"]
    assert pg_ids(work.run_dir, port) == set(range(1, 501))
    assert len(pg_ids(pg.socket_dir, pg.port)) == 600  # the original kept running, untouched
    assert not (target / "postmaster.pid").read_text().startswith(str(pg_pid(pg.datadir)))
    evs = restore_events(cli, point["id"], "postgresql")
    assert_phases_in_order(evs, "postgresql")
    assert "stale postmaster.pid removed" in evs[2]["message"]
    assert f"accepting connections on port {port}" in evs[3]["message"]

    # bad input: the target now holds a cluster; the restore refuses to touch it without --overwrite
    again = cli.run("restore-app", "postgresql", "pgdb", "--to", str(target))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in again.stderr
    assert pg_ids(work.run_dir, port) == set(range(1, 501))


def pg_pid(datadir) -> int:
    return int((datadir / "postmaster.pid").read_text().splitlines()[0])


def test_mariadb_restore_records_the_binlog_position(work, maria, repo):
    cli = repo
    maria.sql(f"INSERT INTO app.ticks(v) {rows(400, 'before')}")
    point = cli.run("backup", "--job", str(maria_job(work, maria)), "--json", check=True).json()
    maria.sql(f"INSERT INTO app.ticks(v) {rows(50, 'after')}")

    target = work.dir / "maria-restored"
    socket = work.run_dir / "restored.sock"
    result = cli.run("restore-app", "mariadb", "mariadb", "--to", str(target), "--socket", str(socket), "--json",
                     check=True).json()  # fmt: skip
    work.defer(stop_mariadb, socket)
    out = sh(["mariadb", "--batch", "--skip-column-names", f"--socket={socket}", "-uroot", "-e",
              "SELECT id FROM app.ticks"]).stdout  # fmt: skip
    assert {int(x) for x in out.split()} == set(range(1, 401))
    meta = point["metadata"]["writers"]["mariadb"]
    position = f"{meta['binlog_file']}:{meta['binlog_position']}"
    assert result["details"]["binlog_position"] == position
    evs = restore_events(cli, point["id"], "mariadb")
    assert_phases_in_order(evs, "mariadb")
    assert f"binary log position at the snapshot {position}" in evs[2]["message"]


def rows(n: int, value: str) -> str:
    return f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n}) SELECT '{value}' FROM s"


def stop_mariadb(socket) -> None:
    sh(["mariadb-admin", f"--socket={socket}", "-uroot", "shutdown"], check=False, timeout=120)


def test_sqlite_restore_drops_the_newer_wal(work, repo):
    cli = repo
    db = work.disk / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [("before",)] * 200)
    conn.close()
    writers = [{"type": "sqlite", "databases": [db]}, {"type": "fsfreeze", "mountpoints": [work.disk]}]
    job = write_job(
        work.dir / "sqlite-job.toml", name="sqlite", sources=[work.image], writers=writers, fallback="require"
    )
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    # The application writes on and dies: its -wal and -shm stay beside the database.
    code = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
        " c.execute('PRAGMA wal_autocheckpoint=0');"
        " [c.execute(\"INSERT INTO t(v) VALUES ('after')\") for _ in range(50)]; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(db)], check=True)
    assert os.path.getsize(f"{db}-wal") > 0 and os.path.exists(f"{db}-shm")

    refused = cli.run("restore-app", "sqlite", "sqlite", "--to", str(db))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    cli.run("restore-app", "sqlite", "sqlite", "--to", str(db), "--overwrite", check=True)
    check = sqlite3.connect(db)
    assert check.execute("SELECT count(*), min(v), max(v) FROM t").fetchone() == (200, "before", "before")
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    assert_phases_in_order(restore_events(cli, point["id"], "sqlite"), "sqlite")
    # bad input: no log history, a point without the writer's data, an unknown writer or name; nothing touched
    target = work.dir / "never"
    for argv, expected in (
        (["sqlite", "sqlite", "--at", "2026-01-01 00:00:00"], "sqlite keeps no log history"),
        (["postgresql", "sqlite"], "holds no postgresql data"),
        (["oracle", "sqlite"], "no restore rules for 'oracle'"),
        (["postgresql", "nosuch"], "no restore point or name 'nosuch'"),
    ):
        result = cli.run("restore-app", *argv, "--to", str(target))
        assert result.returncode in (1, 2), result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not target.exists()
