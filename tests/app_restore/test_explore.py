"""explore: one table (or some of its rows) out of a restore point through a throw-away PostgreSQL on an
overlay of the read-only mount; time to the first row against a full application restore."""

from __future__ import annotations

import csv
import os
import sqlite3
import time

import pytest

from tests.consistency.helpers import free_port, maria_job, pg_job, write_job

from .test_restore_app import stop_pg

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts, FUSE and overlayfs"),
]


def test_postgresql_explore_exports_one_table(work, pg, repo):
    cli = repo
    scratch = work.dir / "tmp"  # where the throw-away servers live: empty again after each command
    scratch.mkdir(mode=0o755)
    cli.env["TMPDIR"] = str(scratch)
    pg.sql(
        "INSERT INTO load(v) SELECT 'row ' || g FROM generate_series(1, 20000) g;"
        " CREATE TABLE customers(id int PRIMARY KEY, name text, city text);"
        " INSERT INTO customers SELECT g, 'customer ' || g, CASE WHEN g % 3 = 0 THEN 'Lyon' ELSE 'Paris' END"
        " FROM generate_series(1, 3000) g; ANALYZE",
        "app",
    )
    point = cli.run("backup", "--job", str(pg_job(work, pg)), "--json", check=True).json()
    pg.sql("DELETE FROM customers WHERE city = 'Lyon'", "app")  # the loss an export recovers

    listed = cli.run("explore", "postgresql", "pgdb", "--list", "--json", check=True).json()
    tables = {(t["database"], t["table"]): t for t in listed}
    assert tables[("app", "public.customers")]["rows"] == 3000
    assert ("app", "public.load") in tables

    out = work.dir / "lyon.csv"
    result = cli.run("explore", "postgresql", "pgdb", "--export", "app.customers", "--where", "city = 'Lyon'",
                     "--to", str(out), "--json", check=True).json()  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["rows"] == 1000
    assert {r["city"] for r in rows} == {"Lyon"} and sorted(int(r["id"]) for r in rows) == list(range(3, 3001, 3))
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    dump = work.dir / "app.dump"
    cli.run("explore", "postgresql", point["id"], "--export", "app", "--format", "custom", "--to", str(dump),
            check=True)  # fmt: skip
    assert dump.read_bytes()[:5] == b"PGDMP"
    # the restore point was only read: nothing of the throw-away server is left behind
    assert os.listdir(scratch) == []

    # bad input: a missing table, a missing database, --where without a table
    for item, extra, message in (
        ("app.nosuch", [], "table 'nosuch' is not in database 'app'"),
        ("nodb.customers", [], "database 'nodb' is not in the restore point"),
        ("app", ["--where", "true"], "--where needs a table"),
    ):
        bad = cli.run("explore", "postgresql", "pgdb", "--export", item, *extra, "--to", str(work.dir / "x.csv"))
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode in (1, 2) and last.startswith("error: ") and message in last, bad.stderr
        assert bad.stderr.count("error:") == 1, bad.stderr
    assert not (work.dir / "x.csv").exists()

    # against a full application restore of the same point, to a server answering the same query
    began = time.monotonic()
    target = work.dir / "full"
    port = free_port()
    work.defer(stop_pg, target)
    cli.run("restore-app", "postgresql", "pgdb", "--to", str(target), "--port", str(port), "--socket",
            str(work.run_dir), "--no-archive", check=True)  # fmt: skip
    full = time.monotonic() - began
    began = time.monotonic()
    cli.run("restore", point["id"], "--to", str(work.store / "whole.img"), check=True)
    image = time.monotonic() - began
    print(
        f"\n[explore postgresql] first exported row after {result['first_row_seconds']:.2f} s "
        f"(throw-away server ready after {result['timings']['server_ready']:.2f} s), export done in "
        f"{result['seconds']:.2f} s; full application restore of the same point: {full:.2f} s; "
        f"restore of the whole image alone (before any mount or server start): {image:.2f} s; "
        f"image size {point['disks'][0]['size'] >> 20} MiB"
    )
    assert result["first_row_seconds"] <= result["seconds"]


def test_mariadb_explore_exports_rows_and_a_dump(work, maria, repo):
    cli = repo
    maria.sql(
        "INSERT INTO app.ticks(v) WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 800)"
        " SELECT IF(n % 4 = 0, 'tab\tand\\\\slash', 'x') FROM s"
    )
    cli.run("backup", "--job", str(maria_job(work, maria)), check=True)
    maria.sql("DROP TABLE app.ticks")

    listed = cli.run("explore", "mariadb", "mariadb", "--list", "--json", check=True).json()
    assert ("app", "ticks") in {(t["database"], t["table"]) for t in listed}
    out = work.dir / "ticks.csv"
    result = cli.run("explore", "mariadb", "mariadb", "--export", "app.ticks", "--where", "id % 4 = 0",
                     "--to", str(out), "--json", check=True).json()  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["rows"] == 200
    assert {r["v"] for r in rows} == {"tab\tand\\slash"} and {int(r["id"]) % 4 for r in rows} == {0}
    dump = work.dir / "app.sql"
    cli.run("explore", "mariadb", "mariadb", "--export", "app", "--to", str(dump), check=True)
    assert "CREATE TABLE `ticks`" in dump.read_text()
    bad = cli.run("explore", "mariadb", "mariadb", "--export", "app.nosuch", "--to", str(work.dir / "x.csv"))
    assert bad.returncode == 1 and "table 'nosuch' is not in database 'app'" in bad.stderr.splitlines()[-1]
    print(f"\n[explore mariadb] first exported row after {result['first_row_seconds']:.2f} s")


def test_sqlite_explore_reads_the_wal_of_the_snapshot(work, repo):
    cli = repo
    db = work.disk / "shop.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # rows stay in the -wal: the point holds database + WAL
    conn.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT)")
    conn.executemany("INSERT INTO orders(item) VALUES (?)", [("book",), ("pen",)] * 150)
    writers = [{"type": "sqlite", "databases": [db]}, {"type": "fsfreeze", "mountpoints": [work.disk]}]
    job = write_job(work.dir / "shop.toml", name="shop", sources=[work.image], writers=writers, logs="keep")
    cli.run("backup", "--job", str(job), check=True)
    conn.close()

    listed = cli.run("explore", "sqlite", "shop", "--list", "--json", check=True).json()
    assert [(t["database"], t["table"], t["rows"]) for t in listed] == [("shop", "orders", 300)]
    out = work.dir / "pens.csv"
    result = cli.run("explore", "sqlite", "shop", "--export", "shop.orders", "--where", "item = 'pen'",
                     "--to", str(out), "--json", check=True).json()  # fmt: skip
    assert result["rows"] == 150 and out.read_text().splitlines()[0] == "id,item"
    copy = work.dir / "shop-copy.db"
    cli.run("explore", "sqlite", "shop", "--export", "shop", "--to", str(copy), check=True)
    check = sqlite3.connect(copy)
    assert check.execute("SELECT count(*) FROM orders").fetchone() == (300,)
    check.close()
