"""Fixtures for the application-aware backup tests: a reflink store, a disk image, real database servers.

Needs root (loop devices, mounts, fsfreeze) and the packages that scripts/setup-databases installs;
without them every test here is skipped with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .helpers import MariaDB, Postgres, Work, missing_tools


@pytest.fixture
def work() -> Iterator[Work]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mounts and fsfreeze")
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
def repo(cli):
    """The test's repository (tests/conftest.py's `cli` runs the real command against it)."""
    cli.run("init", check=True)
    return cli


@pytest.fixture
def pg(work: Work) -> Postgres:
    """PostgreSQL 15 with its data directory on the disk image and its WAL archive outside it."""
    server = Postgres(work, work.disk / "pgdata")
    server.initdb(work.dir / "wal_archive")
    server.start()
    server.sql("CREATE DATABASE app")
    server.sql(
        "CREATE TABLE load(id bigserial PRIMARY KEY, v text NOT NULL, at timestamptz DEFAULT clock_timestamp());"
        " CREATE EXTENSION amcheck;",
        "app",
    )
    server.switch_wal(4, "app")  # archived segments for the log modes to keep or prune
    return server


@pytest.fixture
def maria(work: Work) -> MariaDB:
    """MariaDB with its data directory and binary logs on the disk image; a few binary logs already rotated."""
    server = MariaDB(work, work.disk / "mysql")
    server.install()
    server.start()
    server.sql(
        "CREATE DATABASE app; CREATE TABLE app.ticks(id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(16) NOT NULL)"
        " ENGINE=InnoDB; CREATE TABLE app.filler(x INT) ENGINE=InnoDB"
    )
    for i in range(3):
        server.sql(f"INSERT INTO app.filler VALUES ({i}); FLUSH BINARY LOGS")
    return server
