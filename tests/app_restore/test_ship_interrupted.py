"""`logs ship` interrupted after its first WAL file: the files shipped so far are recorded, nothing is
removed from the server's archive (logs go only once the repository holds them all), no lock stays,
and the next run ships the rest and only then empties the archive."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import SUREPOINT
from tests.consistency.helpers import pg_job
from tests.security.pause import Pause, interrupt, last_line

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices")]


def test_interrupted_shipping_removes_nothing_and_the_next_run_finishes(work, pg, repo, tmp_path):
    cli = repo
    job = pg_job(work, pg, logs="truncate")
    cli.run("backup", "--job", str(job), "--json", check=True)
    pg.switch_wal(3, "app")
    archived = pg.wal_segments()
    assert len(archived) >= 3, archived
    pause = Pause(tmp_path / "pause", "ship-log")  # the first file is stored and recorded
    result = interrupt(pause, [SUREPOINT, "logs", "ship", "--job", str(job), "--json"], cli.env, signal.SIGTERM)
    err = result.stderr
    assert result.returncode == 143, err
    assert "Traceback" not in err, err
    assert last_line(err).startswith("error: interrupted by SIGTERM: 1 log file(s) shipped and recorded"), err
    assert pg.wal_segments() >= archived, "the archive lost files before they were all shipped"
    listed = cli.run("logs", "list", "postgresql", "pgdb", "--json", check=True).json()
    (first,) = [r["file"] for r in listed if r["file"] in archived]
    assert [p for p in (cli.repo / "locks").iterdir() if not p.name.endswith(".tmp")] == []
    events = cli.run("events", "--json", "--limit", "100", check=True).json()
    events = events["events"] if isinstance(events, dict) else events
    assert any("interrupted by SIGTERM" in e["message"] and e["outcome"] == "failed" for e in events), events

    again = cli.run("logs", "ship", "--job", str(job), "--json", check=True).json()
    assert archived - {first} <= set(again[0]["shipped"]) and first in again[0]["already"], again
    listed = cli.run("logs", "list", "postgresql", "pgdb", "--json", check=True).json()
    assert archived <= {r["file"] for r in listed}
    assert not (pg.wal_segments() & archived), "shipped WAL stays on the server"
