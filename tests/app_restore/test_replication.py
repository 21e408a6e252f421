"""A PostgreSQL primary and its streaming replica on 127.0.0.1 sockets: restoring either one never leaves
them diverged. Non-authoritative: a lost replica comes back from a restore point as a standby and
catches up. Authoritative: the primary comes back from a point on a new timeline; its old replica,
ahead on the old timeline, refuses to follow (no silent divergence), is named for re-sync, and
is re-synced by a restore as a replica. Every table has the same checksum on both afterwards."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.consistency.helpers import PG_BIN, Postgres, chown, free_port, pg_job, sh

from .test_restore_app import assert_phases_in_order, restore_events, stop_pg

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"),
]

CHECKSUM = "SELECT count(*) || ':' || md5(coalesce(string_agg(id || '/' || v, ',' ORDER BY id), '')) FROM load"


def checksum(socket_dir, port) -> str:
    return sh(["psql", "-X", "-A", "-t", "-h", socket_dir, "-p", port, "-U", "postgres", "-d", "app", "-c",
               CHECKSUM]).stdout.strip()  # fmt: skip


def caught_up(primary: Postgres, socket_dir, port, timeout: float = 60) -> str:
    """Wait until the standby has replayed everything the primary wrote; return their common checksum."""
    target = primary.sql("SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replayed = sh(["psql", "-X", "-A", "-t", "-h", socket_dir, "-p", port, "-U", "postgres", "-c",
                       f"SELECT pg_last_wal_replay_lsn() >= '{target}'"]).stdout.strip()  # fmt: skip
        if replayed == "t":
            return checksum(socket_dir, port)
        time.sleep(0.1)
    raise AssertionError("the standby did not catch up")


REFUSAL = re.compile(
    r"forked off current database system timeline|is not in this server's history|"
    r"is not a child of this server's history"
)


def wait_for_log(log, pattern: re.Pattern, timeout: float = 60) -> str:
    """The first line of a server log matching `pattern` (the replica says why it does not follow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if pattern.search(line):
                return line.strip()
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern.pattern!r} in {log}:\n" + log.read_text()[-3000:])


def test_replicated_pair_restores_without_divergence(work, pg, repo):
    cli = repo
    pg.sql("ALTER SYSTEM SET wal_keep_size = '64MB'")
    pg.sql("SELECT pg_reload_conf()")
    conninfo = f"host={pg.socket_dir} port={pg.port} user=postgres application_name=replica1"
    replica_dir = work.dir / "replica"
    replica_dir.mkdir(mode=0o700)
    chown(replica_dir, "postgres")
    sh(["runuser", "-u", "postgres", "--", PG_BIN / "pg_basebackup", "-D", replica_dir, "-h", pg.socket_dir,
        "-p", pg.port, "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-d", conninfo], timeout=120)  # fmt: skip
    replica_port = free_port()
    replica = Postgres(work, replica_dir, port=replica_port)
    replica.start("-c archive_mode=off")
    pg.sql("INSERT INTO load(v) SELECT 'before' FROM generate_series(1, 400)", "app")
    point = cli.run("backup", "--job", str(pg_job(work, pg)), "--json", check=True).json()
    pg.sql("INSERT INTO load(v) SELECT 'after' FROM generate_series(1, 100)", "app")
    assert caught_up(pg, work.run_dir, replica_port) == checksum(pg.socket_dir, pg.port)

    # Non-authoritative: the replica is lost; it comes back from the point as a standby and catches up.
    replica.stop("immediate")
    cli.run("restore-app", "postgresql", "pgdb", "--to", str(replica_dir), "--overwrite", "--replica-of", conninfo,
            "--port", str(replica_port), "--socket", str(work.run_dir), "--no-archive", check=True)  # fmt: skip
    pg.sql("INSERT INTO load(v) SELECT 'later' FROM generate_series(1, 50)", "app")
    primary_sum = checksum(pg.socket_dir, pg.port)
    assert caught_up(pg, work.run_dir, replica_port) == primary_sum
    assert primary_sum.startswith("550:")

    # Authoritative: the primary comes back from the point (400 rows) on a new timeline.
    result = cli.run("restore-app", "postgresql", "pgdb", "--to", str(pg.datadir), "--overwrite", "--json",
                     check=True).json()  # fmt: skip
    assert result["details"]["timeline"] >= 2
    assert result["details"]["replicas_to_resync"] == ["replica1@local socket"]
    evs = restore_events(cli, point["id"], "postgresql")
    assert_phases_in_order(evs, "postgresql")
    assert "replicas of it (replica1@local socket) must be re-synced" in evs[1]["message"]
    assert f"stopped the server running on {pg.datadir}" in evs[1]["message"]
    aside = [p for p in work.disk.iterdir() if p.name.startswith("pgdata.before-restore-")]
    assert len(aside) == 1 and (aside[0] / "PG_VERSION").exists()  # the replaced cluster is kept, not deleted
    restored_sum = checksum(pg.socket_dir, pg.port)
    assert restored_sum.startswith("400:")
    # The old replica (550 rows, old timeline) does not follow: it keeps its rows and never streams.
    pg.sql("INSERT INTO load(v) SELECT 'new' FROM generate_series(1, 10)", "app")
    refusal = wait_for_log(replica_dir / "surepoint-restore.log", REFUSAL)  # the log restore-app gave it
    print(f"\n[replicated pair] the old replica refuses the restored primary: {refusal}")
    assert checksum(work.run_dir, replica_port) == primary_sum
    streaming = sh(["psql", "-X", "-A", "-t", "-h", work.run_dir, "-p", replica_port, "-U", "postgres", "-c",
                    "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"]).stdout.strip()  # fmt: skip
    assert streaming == "0"

    # Re-sync: the replica restored from the same point as a standby of the restored primary.
    replica.stop("immediate")
    work.defer(stop_pg, replica_dir)
    cli.run("restore-app", "postgresql", "pgdb", "--to", str(replica_dir), "--overwrite", "--replica-of", conninfo,
            "--port", str(replica_port), "--socket", str(work.run_dir), "--no-archive", check=True)  # fmt: skip
    final = checksum(pg.socket_dir, pg.port)
    assert final.startswith("410:")
    assert caught_up(pg, work.run_dir, replica_port) == final
    print(f"\n[replicated pair] primary and replica agree after both restores: {final}")
