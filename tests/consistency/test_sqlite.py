"""SQLite (WAL mode) on a disk image, written by a loop: the restored database is intact and complete."""

from __future__ import annotations

import os
import sqlite3

import pytest

from .helpers import SqliteLoad, events, find_event, freeze_moment, frozen_window, write_job

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and fsfreeze"),
]


def test_sqlite_under_load_restores_every_committed_row(work, repo):
    cli = repo
    (work.disk / "sqlite").mkdir()
    db = work.disk / "sqlite" / "app.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE load(id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT NOT NULL)")
    con.close()
    job = write_job(
        work.dir / "sqlite-job.toml",
        name="sqlitedb",
        sources=[work.image],
        writers=[{"type": "sqlite", "databases": [db]}, {"type": "fsfreeze", "mountpoints": [work.disk]}],
        logs="truncate",
        fallback="require",
    )
    load = SqliteLoad(db)
    load.start()
    work.defer(load.stop)
    load.wait_for(50)

    point = cli.run("backup", "--job", str(job), "--json", check=True).json()
    load.wait_for(len(load.commits) + 20)
    load.stop()
    assert load.error is None, load.error
    assert point["consistency"] == "application"
    evs = events(cli, point["id"])
    before_freeze = load.committed_before(freeze_moment(evs, "fsfreeze"))
    assert len(before_freeze) >= 50
    find_event(evs, "sqlite", "prune-logs")  # checkpointed after the commit (busy under load is fine)

    restored_img = work.store / "restored.img"
    cli.run("restore", "sqlitedb:latest", "--to", str(restored_img), check=True)
    mount = work.mount_restored(restored_img)
    restored = sqlite3.connect(mount / "sqlite" / "app.db")
    try:
        assert restored.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found = {row[0] for row in restored.execute("SELECT id FROM load")}
    finally:
        restored.close()
    missing = sorted(before_freeze - found)
    print(
        f"\n[sqlite under load] rows committed before the freeze: {len(before_freeze)}; rows found after restore: "
        f"{len(found)}; missing: {len(missing)}; rows committed in all: {len(load.commits)}; "
        f"freeze: {point['metadata']['freeze_seconds']:.3f} s snapshot, {frozen_window(evs):.3f} s first freeze to "
        "last thaw"
    )
    assert not missing, f"committed before the freeze but missing after restore: {missing[:20]}"
