"""Point-in-time recovery from shipped logs: rows committed under load; a restore to a moment in the
middle holds exactly the rows committed up to that moment, not one more, not one less."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from tests.consistency.helpers import SessionLoad, free_port, maria_job, pg_job, sh, write_job

from .test_restore_app import assert_phases_in_order, pg_ids, restore_events, stop_mariadb, stop_pg

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"),
]


def iso_us(micros: int) -> str:
    """A UTC time with microseconds, as restore-app --at takes it."""
    return datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000).isoformat()


def micros(iso: str) -> int:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def test_postgresql_point_in_time_is_exact(work, pg, repo):
    cli = repo
    job = pg_job(work, pg, logs="truncate")
    load = SessionLoad("pg-load", pg.psql_argv("app"), "INSERT INTO load(v) VALUES ('x') RETURNING id;\n")
    load.start()
    work.defer(load.stop)
    load.wait_for(30)
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    load.wait_for(len(load.commits) + 400)
    load.stop()
    assert load.error is None, load.error
    pg.wait_archived(pg.sql("SELECT pg_walfile_name(pg_switch_wal())"))

    shipped = cli.run("logs", "ship", "--job", str(job), "--json", check=True).json()
    assert shipped[0]["shipped"] and not pg.wal_segments(), "shipped WAL stays on the server"
    listed = cli.run("logs", "list", "postgresql", "pgdb", "--json", check=True).json()
    assert {r["file"] for r in listed} >= set(shipped[0]["shipped"])

    # Commit times as PostgreSQL wrote them in the WAL commit records (track_commit_timestamp).
    rows = pg.sql(
        "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint FROM load ORDER BY 2", "app"
    )
    commits = [(int(i), int(t)) for i, t in (line.split("|") for line in rows.splitlines())]
    snapshot = micros(point["metadata"]["writers"]["postgresql"]["snapshot_time"])
    later = [c for c in commits if c[1] > snapshot]
    assert len(later) >= 300, f"only {len(later)} commits after the image point"
    i = len(later) // 2
    while later[i + 1][1] - later[i][1] < 2:
        i += 1
    target = (later[i][1] + later[i + 1][1]) // 2
    expected = {row_id for row_id, at in commits if at <= target}

    restored = work.dir / "pg-pitr"
    port = free_port()
    work.defer(stop_pg, restored)
    options = ["--port", str(port), "--socket", str(work.run_dir), "--no-archive", "--json"]
    result = cli.run("restore-app", "postgresql", "pgdb", "--at", iso_us(target), "--to", str(restored), *options,
                     check=True).json()  # fmt: skip
    found = pg_ids(work.run_dir, port)
    print(
        f"\n[postgresql PITR] commits in all {len(commits)}, after the image point {len(later)}; target "
        f"{iso_us(target)}; expected {len(expected)} rows, found {len(found)}; missing "
        f"{len(expected - found)}, extra {len(found - expected)}; {len(result['logs_replayed'])} WAL files replayed "
        f"in {result['seconds']:.1f} s ({result['details'].get('recovery_stop')})"
    )
    assert found == expected
    assert result["restore_point"] == point["id"]
    assert_phases_in_order(restore_events(cli, point["id"], "postgresql"), "postgresql")
    # the restored cluster is a normal primary again, on a new timeline, without recovery settings
    check = sh(["psql", "-X", "-A", "-t", "-h", work.run_dir, "-p", port, "-U", "postgres", "-c",
                "SELECT pg_is_in_recovery(), current_setting('restore_command') = ''"]).stdout.strip()  # fmt: skip
    assert check == "f|t"

    # bad input: before the first point, after the last shipped log, a point whose logs were never shipped
    first = commits[0][1] - 3_600_000_000
    for at, message in (
        (iso_us(first), "is before the first restore point of pgdb"),
        (iso_us(commits[-1][1] + 3_600_000_000), "is after the last shipped log of pgdb"),
    ):
        bad = cli.run("restore-app", "postgresql", "pgdb", "--at", at, "--to", str(work.dir / "never"))
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    other = write_job(work.dir / "other.toml", name="pgdb-other", sources=[work.image], fallback="require",
                      writers=[{"type": "postgresql", "host": pg.socket_dir, "port": pg.port, "user": "postgres",
                                "os_user": "postgres", "wal_archive": pg.archive}], logs="keep")  # fmt: skip
    cli.run("backup", "--job", str(other), check=True)
    bad = cli.run("restore-app", "postgresql", "pgdb-other", "--at", iso_us(commits[-1][1] + 60_000_000),
                  "--to", str(work.dir / "never"))  # fmt: skip
    assert bad.returncode == 2 and "no logs of pgdb-other (postgresql) are in the repository" in bad.stderr, bad.stderr
    assert not (work.dir / "never").exists()


def test_mariadb_point_in_time_is_exact(work, maria, repo):
    cli = repo
    job = maria_job(work, maria)
    insert = "INSERT INTO ticks(v) VALUES ('x'); SELECT LAST_INSERT_ID();\n"
    load = SessionLoad("mariadb-load", [*maria.client_argv(), "--unbuffered", "app"], insert)
    load.start()
    work.defer(load.stop)
    load.wait_for(30)
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    snapshot = micros(point["metadata"]["writers"]["mariadb"]["snapshot_time"])
    # binary log events carry whole seconds: let the load run over a few of them
    while not load.commits or load.commits[-1][1] * 1_000_000 < snapshot + 3_500_000:
        load.wait_for(len(load.commits) + 20)
    load.stop()
    assert load.error is None, load.error

    shipped = cli.run("logs", "ship", "--job", str(job), "--json", check=True).json()
    assert shipped[0]["shipped"] and shipped[0]["removed_on_server"]
    assert len(maria.binlog_files()) == 1, "shipped binary logs stay on the server"

    rows = maria.sql("SELECT id, CAST(UNIX_TIMESTAMP(at) * 1000000 AS SIGNED) FROM ticks", "app")
    commits = sorted((int(i), int(t)) for i, t in rows)
    target = (snapshot // 1_000_000 + 2) * 1_000_000  # a whole second with commits on both sides
    expected = {row_id for row_id, at in commits if at < target}
    assert expected and len(expected) < len(commits)

    restored = work.dir / "maria-pitr"
    socket = work.run_dir / "pitr.sock"
    result = cli.run("restore-app", "mariadb", "mariadb", "--at", iso_us(target), "--to", str(restored),
                     "--socket", str(socket), "--json", check=True).json()  # fmt: skip
    work.defer(stop_mariadb, socket)
    out = sh(["mariadb", "--batch", "--skip-column-names", f"--socket={socket}", "-uroot", "-e",
              "SELECT id FROM app.ticks"]).stdout  # fmt: skip
    found = {int(x) for x in out.split()}
    print(
        f"\n[mariadb PITR] commits in all {len(commits)}; target {iso_us(target)}; expected {len(expected)} rows, "
        f"found {len(found)}; missing {len(expected - found)}, extra {len(found - expected)}; "
        f"{len(result['logs_replayed'])} binary logs replayed in {result['seconds']:.1f} s"
    )
    assert found == expected
    assert_phases_in_order(restore_events(cli, point["id"], "mariadb"), "mariadb")
    bad = cli.run("restore-app", "mariadb", "mariadb", "--at", iso_us(target + 500_000), "--to", str(work.dir / "no"))
    assert bad.returncode == 2 and "whole seconds" in bad.stderr, bad.stderr
