"""PostgreSQL 15 on a disk image: backups under load restore to a server that recovers with every committed row;
WAL archive handling per log mode; fallback when the writer fails; what `writers detect` shows."""

from __future__ import annotations

import os
import re
import signal

import pytest

from .helpers import (
    PG_BIN,
    Postgres,
    SessionLoad,
    events,
    find_event,
    free_port,
    freeze_moment,
    frozen_window,
    pg_job,
    sh,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and fsfreeze"),
]

INSERT = "INSERT INTO load(v) VALUES ('x') RETURNING id;\n"


def start_restored(work, cli, name: str = "pgdb:latest") -> Postgres:
    """Restore the image, mount a read-write copy and start PostgreSQL on it (another port, no archiving)."""
    restored = work.store / "restored.img"
    cli.run("restore", name, "--to", str(restored), check=True)
    mount = work.mount_restored(restored)
    server = Postgres(work, mount / "pgdata")
    control = sh([PG_BIN / "pg_controldata", server.datadir]).stdout
    # the snapshot is of a running server: PostgreSQL must recover, as after a power cut
    assert "Database cluster state:               in production" in control, control
    # The pid file names the original server's postmaster, which is still running on this machine.
    (server.datadir / "postmaster.pid").unlink(missing_ok=True)
    server.start("-c archive_mode=off")
    log = server.log.read_text()
    assert "database system is ready to accept connections" in log, log
    return server


def pruned_in(message: str) -> set[str]:
    """The WAL segments a prune-logs event lists (the 'kept from' one excluded)."""
    return set(re.findall(r"\b[0-9A-F]{24}\b", message.split("; kept from")[0]))


def pruned_below(before: set[str], start: str) -> set[str]:
    return {s for s in before if s < start}


def test_postgresql_under_load_restores_every_committed_row(work, pg, repo):
    """Application-consistent backup while rows are inserted; logs=truncate prunes the archive; restore recovers."""
    cli = repo
    job = pg_job(work, pg, logs="truncate", fallback="require")
    archived_before = pg.wal_segments()
    load = SessionLoad("pg-load", pg.psql_argv("app"), INSERT)
    load.start()
    work.defer(load.stop)
    load.wait_for(50)

    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    at_backup_end = len(load.commits)
    load.wait_for(at_backup_end + 20)  # the load goes on after the thaw
    load.stop()
    assert load.error is None, load.error
    assert point["consistency"] == "application"

    evs = events(cli, point["id"])
    frozen_at = freeze_moment(evs, "fsfreeze")
    before_freeze = load.committed_before(frozen_at)
    assert len(before_freeze) >= 50

    # logs = truncate: archived WAL older than the backup's start segment are gone, the rest kept
    start = point["metadata"]["writers"]["postgresql"]["start_wal_file"]
    expected = pruned_below(archived_before, start)
    assert expected, f"no archived segment older than {start}: {sorted(archived_before)}"
    archived_after = pg.wal_segments()
    assert not archived_after & expected
    assert all(s >= start for s in archived_after), sorted(archived_after)
    prune = find_event(evs, "postgresql", "prune-logs", "ok")
    listed = pruned_in(prune["message"])
    assert expected <= listed and all(s < start for s in listed), prune["message"]
    assert f"pruned {len(listed)}:" in prune["message"] and prune["message"].endswith(f"kept from {start}")

    # restore: PostgreSQL recovers and has every row whose COMMIT returned before the freeze
    restored = start_restored(work, cli)
    found = {int(x) for x in restored.sql("SELECT id FROM load", "app").split()}
    missing = sorted(before_freeze - found)
    print(
        f"\n[postgresql under load] rows committed before the freeze: {len(before_freeze)} "
        f"(highest id {max(before_freeze)}); rows found after restore: {len(found)} "
        f"(highest id {max(found) if found else None}); missing: {len(missing)}; "
        f"rows committed in all: {len(load.commits)}; freeze: {point['metadata']['freeze_seconds']:.3f} s snapshot, "
        f"{frozen_window(evs):.3f} s first freeze to last thaw"
    )
    assert not missing, f"committed before the freeze but missing after restore: {missing[:20]}"
    # the image is the frozen moment, not the disk as it was when the backup finished reading it
    assert max(found) < max(i for i, _ in load.commits)
    amcheck = sh(
        [PG_BIN / "pg_amcheck", "-h", restored.socket_dir, "-p", restored.port, "-U", "postgres", "-d", "app",
         "--heapallindexed", "--progress"],
        check=False,
    )  # fmt: skip
    assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr


def test_postgresql_killed_before_commit_keeps_every_wal(work, pg, repo):
    """A backup killed after the snapshot but before its commit leaves no restore point and prunes nothing."""
    cli = repo
    job = pg_job(work, pg, logs="truncate")
    archived_before = set(os.listdir(pg.archive))

    killed = cli.run("backup", "--job", str(job), env={"SUREPOINT_FAULT": "before-commit"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cli.points() == []
    assert archived_before <= set(os.listdir(pg.archive))
    evs = events(cli)
    find_event(evs, "fsfreeze", "thaw", "ok")  # it was killed after the snapshot
    assert not [e for e in evs if e["phase"] in ("prune-logs", "commit")]

    # The next backup runs normally (the stale snapshot clone is replaced) and only it prunes.
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    start = point["metadata"]["writers"]["postgresql"]["start_wal_file"]
    assert all(s >= start for s in pg.wal_segments())
    assert not os.path.exists(str(work.image) + ".surepoint-snapshot")


@pytest.mark.parametrize("mode", ["keep", "copy-only"])
def test_postgresql_log_modes_that_prune_nothing(work, pg, repo, mode):
    cli = repo
    job = pg_job(work, pg, logs=mode)
    archived_before = pg.wal_segments()
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    assert point["consistency"] == "application"
    assert point["metadata"]["log_mode"] == mode
    start = point["metadata"]["writers"]["postgresql"]["start_wal_file"]
    assert pruned_below(archived_before, start)  # there was something that truncate would have pruned
    assert archived_before <= pg.wal_segments()
    find_event(events(cli, point["id"]), "postgresql", "prune-logs", "skipped")


def test_postgresql_after_verify_prunes_only_once_verified(work, pg, repo):
    cli = repo
    job = pg_job(work, pg, logs="after-verify")
    archived_before = pg.wal_segments()
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    start = point["metadata"]["writers"]["postgresql"]["start_wal_file"]
    expected = pruned_below(archived_before, start)
    assert expected
    assert archived_before <= pg.wal_segments()
    find_event(events(cli, point["id"]), "postgresql", "prune-logs", "pending")
    assert cli.points()[0]["state"] == "unverified"

    cli.run("verify", check=True)
    assert cli.points()[0]["state"] == "verified"
    after = pg.wal_segments()
    assert not after & expected
    assert all(s >= start for s in after)
    prune = find_event(events(cli, point["id"]), "postgresql", "prune-logs", "ok")
    assert expected <= pruned_in(prune["message"]), prune["message"]

    # a second verify has nothing left to prune
    cli.run("verify", check=True)
    assert len([e for e in events(cli, point["id"]) if e["phase"] == "prune-logs" and e["outcome"] == "ok"]) == 1


def test_postgresql_writer_fails_with_fallback_try_gives_filesystem_consistency(work, pg, repo):
    """PostgreSQL is stopped: the writer fails, fsfreeze still works, the point says filesystem, nothing pruned."""
    cli = repo
    job = pg_job(work, pg, logs="truncate", fallback="try")
    archived_before = set(os.listdir(pg.archive))
    pg.stop()

    result = cli.run("backup", "--job", str(job), "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["consistency"] == "filesystem"
    assert "filesystem-consistent only" in result.stderr
    listed = cli.points()
    assert [p["consistency"] for p in listed] == ["filesystem"]
    assert set(os.listdir(pg.archive)) == archived_before

    evs = events(cli, listed[0]["id"])
    find_event(evs, "postgresql", "identify", "failed")
    find_event(evs, "fsfreeze", "freeze", "ok")
    find_event(evs, "postgresql", "prune-logs", "skipped")
    find_event(evs, "job", "finish", "warning")
    # filesystem-consistent: the frozen ext4 needs no journal replay and checks clean
    restored = work.store / "restored.img"
    cli.run("restore", "pgdb:latest", "--to", str(restored), check=True)
    fsck = sh(["e2fsck", "-fn", restored], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("failure", ["wrong-port", "wrong-password"])
def test_postgresql_writer_fails_with_fallback_require_fails_the_job(work, pg, repo, failure):
    """The job fails with one clear error line, no restore point, nothing pruned, nothing left frozen."""
    cli = repo
    if failure == "wrong-port":
        job = pg_job(work, pg, logs="truncate", fallback="require", port=free_port())
        reason = "No such file or directory"
    else:
        # a role that must give a password over the socket (the rest of the cluster trusts local users)
        pg.sql("CREATE ROLE backup_pw LOGIN SUPERUSER PASSWORD 'right'")
        hba = pg.datadir / "pg_hba.conf"
        hba.write_text("local all backup_pw scram-sha-256\n" + hba.read_text())
        pg.sql("SELECT pg_reload_conf()")
        job = pg_job(work, pg, logs="truncate", fallback="require", user="backup_pw", password="wrong", os_user="")
        reason = 'password authentication failed for user "backup_pw"'
    archived_before = set(os.listdir(pg.archive))

    result = cli.run("backup", "--job", str(job))
    assert result.returncode not in (0, -signal.SIGKILL), result.stderr
    # the last line is the error, whole on one line (the lines before it are the job's progress log)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: application-aware processing failed and the job requires it: "), result.stderr
    assert "postgresql identify: cannot connect to PostgreSQL" in error and reason in error, result.stderr
    assert result.stderr.count("error: application-aware") == 1, result.stderr
    assert cli.points() == []
    assert set(os.listdir(pg.archive)) == archived_before
    evs = events(cli)
    find_event(evs, "job", "finish", "failed")
    assert not [e for e in evs if e["phase"] in ("freeze", "prune-logs")]
    (work.disk / "still-writable").write_text("not frozen")  # would hang on a frozen filesystem


def test_writers_detect_shows_postgresql_components(work, pg, repo):
    cli = repo
    job = pg_job(work, pg)
    found = cli.run("writers", "detect", "--job", str(job), "--json", check=True).json()
    writer = next(w for w in found if w["type"] == "postgresql")
    assert writer["status"] == "found", writer
    comps = {c["name"]: c for c in writer["components"]}
    assert comps["cluster"] == {"name": "cluster", "kind": "data", "paths": [str(pg.datadir)]}
    assert comps["wal"] == {"name": "wal", "kind": "log", "paths": [f"{pg.datadir}/pg_wal"]}
    assert comps["wal archive"] == {"name": "wal archive", "kind": "log", "paths": [str(pg.archive)]}
    fs = next(w for w in found if w["type"] == "fsfreeze")
    assert fs["components"][0]["paths"] == [str(work.disk)]

    table = cli.run("writers", "detect", "--job", str(job), check=True).stdout
    assert f"data cluster: {pg.datadir}" in table and f"log wal: {pg.datadir}/pg_wal" in table, table

    host = cli.run("writers", "detect", "--json", check=True).json()
    ours = [w for w in host if w["type"] == "postgresql" and w["components"][0]["paths"] == [str(pg.datadir)]]
    assert ours, host
    # identify opened no base backup: a real backup right after works
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    assert point["consistency"] == "application"
