"""Fixtures for application-aware restore: the real servers of tests/consistency on a reflink store.

Needs root (loop devices, mounts, FUSE) and what scripts/setup-databases installs; without them
every test here is skipped with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.consistency.helpers import MariaDB, Postgres, Work, missing_tools


@pytest.fixture
def work() -> Iterator[Work]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mounts and FUSE")
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run scripts/setup-databases")
    w = Work()
    try:
        w.make_store()
        w.make_disk()
        yield w
    finally:
        w.close()


@pytest.fixture
def repo(cli, tmp_path, monkeypatch):
    """The test's repository; mounts made by restore-app keep their state in the test's folder."""
    cli.env["SUREPOINT_MOUNT_STATE_DIR"] = str(tmp_path / "mounts")
    cli.run("init", check=True)
    return cli


@pytest.fixture
def pg(work: Work) -> Postgres:
    """PostgreSQL 15 on the disk image, archiving WAL outside it, recording commit timestamps."""
    server = Postgres(work, work.disk / "pgdata")
    server.initdb(work.dir / "wal_archive")
    with open(server.datadir / "postgresql.conf", "a") as f:
        f.write("track_commit_timestamp = on\n")
    server.start()
    server.sql("CREATE DATABASE app")
    server.sql("CREATE TABLE load(id bigserial PRIMARY KEY, v text NOT NULL)", "app")
    return server


@pytest.fixture
def maria(work: Work) -> MariaDB:
    """MariaDB with data and binary logs on the disk image; rows carry their statement's start time."""
    server = MariaDB(work, work.disk / "mysql")
    server.install()
    server.start()
    server.sql(
        "CREATE DATABASE app; CREATE TABLE app.ticks(id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(16) NOT NULL,"
        " at DATETIME(6) NOT NULL DEFAULT NOW(6)) ENGINE=InnoDB"
    )
    return server
