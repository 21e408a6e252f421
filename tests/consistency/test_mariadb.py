"""MariaDB on a disk image: FLUSH TABLES WITH READ LOCK across the snapshot, binary logs purged only after commit."""

from __future__ import annotations

import os
import re
import signal

import pytest

from .helpers import (
    MariaDB,
    SessionLoad,
    events,
    find_event,
    freeze_moment,
    frozen_window,
    maria_job,
    sh,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and fsfreeze"),
]

INSERT = "INSERT INTO ticks(v) VALUES ('x'); SELECT LAST_INSERT_ID();\n"


def test_mariadb_under_load_restores_every_committed_row(work, maria, repo):
    cli = repo
    job = maria_job(work, maria, logs="truncate")
    binlogs_before = maria.binlog_files()
    load = SessionLoad("mariadb-load", [*maria.client_argv(), "--unbuffered", "app"], INSERT)
    load.start()
    work.defer(load.stop)
    load.wait_for(50)

    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    load.wait_for(len(load.commits) + 20)
    load.stop()
    assert load.error is None, load.error
    assert point["consistency"] == "application"

    evs = events(cli, point["id"])
    # FLUSH TABLES WITH READ LOCK, then fsfreeze: every commit that returned before the freeze is in the image
    frozen_at = freeze_moment(evs, "fsfreeze")
    before_freeze = load.committed_before(frozen_at)
    assert len(before_freeze) >= 50

    # logs = truncate: binary logs before the one in use at the freeze are purged, the rest kept
    at_freeze = point["metadata"]["writers"]["mariadb"]["binlog_file"]
    expected = {f for f in binlogs_before if f < at_freeze}
    assert expected, f"no binary log older than {at_freeze}: {sorted(binlogs_before)}"
    after = maria.binlog_files()
    assert not after & expected and all(f >= at_freeze for f in after), sorted(after)
    assert {r[0] for r in maria.sql("SHOW BINARY LOGS")} == after
    prune = find_event(evs, "mariadb", "prune-logs", "ok")
    listed = set(re.findall(r"mysql-bin\.\d+", prune["message"].split("; kept from")[0]))
    assert listed == expected, prune["message"]

    # restore: the server starts (InnoDB crash recovery) with every row committed before the freeze
    restored_img = work.store / "restored.img"
    cli.run("restore", "mariadb:latest", "--to", str(restored_img), check=True)
    mount = work.mount_restored(restored_img)
    restored = MariaDB(work, mount / "mysql", tag="restored")
    restored.start()
    found = {int(r[0]) for r in restored.sql("SELECT id FROM ticks", "app")}
    missing = sorted(before_freeze - found)
    print(
        f"\n[mariadb under load] rows committed before the freeze: {len(before_freeze)}; rows found after restore: "
        f"{len(found)}; missing: {len(missing)}; rows committed in all: {len(load.commits)}; "
        f"freeze: {point['metadata']['freeze_seconds']:.3f} s snapshot, {frozen_window(evs):.3f} s first freeze to "
        "last thaw"
    )
    assert not missing, f"committed before the freeze but missing after restore: {missing[:20]}"
    check = restored.sql("CHECK TABLE app.ticks EXTENDED")
    assert check[-1][2:] == ["status", "OK"], check


def test_mariadb_killed_before_commit_keeps_every_binary_log(work, maria, repo):
    cli = repo
    job = maria_job(work, maria, logs="truncate")
    binlogs_before = maria.binlog_files()

    killed = cli.run("backup", "--job", str(job), env={"SUREPOINT_FAULT": "before-commit"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cli.points() == []
    assert binlogs_before <= maria.binlog_files()
    assert binlogs_before <= {r[0] for r in maria.sql("SHOW BINARY LOGS")}
    evs = events(cli)
    find_event(evs, "mariadb", "thaw", "ok")
    assert not [e for e in evs if e["phase"] in ("prune-logs", "commit")]
    # the read lock went with the killed session: writes go on
    sh([*maria.client_argv("app"), "-e", "INSERT INTO ticks(v) VALUES ('after')"], timeout=20)


@pytest.mark.parametrize("mode", ["keep", "copy-only", "after-verify"])
def test_mariadb_log_modes_that_do_not_prune_at_once(work, maria, repo, mode):
    """keep and copy-only never purge binary logs; after-verify purges them once `surepoint verify` passes."""
    cli = repo
    job = maria_job(work, maria, logs=mode)
    binlogs_before = maria.binlog_files()
    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    assert point["consistency"] == "application" and point["metadata"]["log_mode"] == mode
    at_freeze = point["metadata"]["writers"]["mariadb"]["binlog_file"]
    expected = {f for f in binlogs_before if f < at_freeze}
    assert expected  # there was something that truncate would have purged
    assert binlogs_before <= maria.binlog_files()
    prune = find_event(events(cli, point["id"]), "mariadb", "prune-logs")
    assert prune["outcome"] == ("pending" if mode == "after-verify" else "skipped"), prune

    cli.run("verify", check=True)
    after = maria.binlog_files()
    if mode == "after-verify":
        assert not after & expected and all(f >= at_freeze for f in after), sorted(after)
        prune = find_event(events(cli, point["id"]), "mariadb", "prune-logs", "ok")
        assert set(re.findall(r"mysql-bin\.\d+", prune["message"].split("; kept from")[0])) == expected
    else:
        assert binlogs_before <= after
