"""Database passwords from job files never sit in the catalog, and their copies go once the prune has run."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from surepoint.catalog import Catalog
from surepoint.consistency import registry
from surepoint.consistency.logs import handle_logs, run_pending_prunes
from surepoint.consistency.runner import HostRunner
from surepoint.consistency.writer import PruneReport, Writer

PASSWORD = "s3cr3t-Pa55word-4711"


def _bytes_on_disk(catalog_path: Path) -> bytes:
    """Everything SQLite keeps for the catalog: the database, its write-ahead log and shared memory."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(str(catalog_path) + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


class RecordingWriter(Writer):
    """A writer with logs whose prune records the password it was built with (as a database login would use it)."""

    name = "recording"
    has_logs = True
    seen: list[str | None] = []

    def prune_logs(self, metadata: dict) -> PruneReport:
        RecordingWriter.seen.append(self.secret("password"))
        return PruneReport(pruned=["log.1"], kept_from="log.2")


@pytest.fixture
def recording_writer(monkeypatch):
    monkeypatch.setitem(registry.WRITERS, "recording", RecordingWriter)
    RecordingWriter.seen = []
    return RecordingWriter


def _wait_for_verify(catalog: Catalog, config: dict) -> None:
    events = []
    handle_logs(
        "after-verify",
        [(config, RecordingWriter(HostRunner(), config))],
        {"recording": {"position": 7}},
        catalog=catalog,
        repository_id="repo1",
        restore_point_id="point1",
        source="db01",
        events=lambda *e: events.append(e),
    )
    assert events[-1][2] == "pending"


def test_a_waiting_prune_keeps_its_password_outside_the_catalog(tmp_path, recording_writer):
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(str(path))
    _wait_for_verify(catalog, {"type": "recording", "user": "backup", "password": PASSWORD})
    catalog._db.execute("PRAGMA wal_checkpoint(FULL)")
    assert PASSWORD.encode() not in _bytes_on_disk(path)
    files = list(Path(str(path) + ".credentials").iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700

    # the prune still logs in with the password, and then its copy is gone
    done = run_pending_prunes(catalog, "repo1", "point1", HostRunner(), lambda *e: None)
    assert done == 1 and recording_writer.seen == [PASSWORD]
    assert list(files[0].parent.iterdir()) == []
    assert PASSWORD.encode() not in _bytes_on_disk(path)
    catalog.close()


def test_a_password_file_is_referenced_not_copied(tmp_path, recording_writer):
    secret_file = tmp_path / "db01.password"
    secret_file.write_text(PASSWORD + "\n")
    catalog = Catalog(str(tmp_path / "catalog.sqlite"))
    _wait_for_verify(catalog, {"type": "recording", "password_file": str(secret_file)})
    assert not Path(str(tmp_path / "catalog.sqlite") + ".credentials").exists()
    row = catalog._db.execute("SELECT writer_config FROM pending_log_prunes").fetchone()
    assert json.loads(row[0])["password_file"] == str(secret_file)
    run_pending_prunes(catalog, "repo1", "point1", HostRunner(), lambda *e: None)
    assert recording_writer.seen == [PASSWORD]
    catalog.close()


def test_forgotten_points_drop_their_prunes_and_credentials(tmp_path, recording_writer):
    catalog = Catalog(str(tmp_path / "catalog.sqlite"))
    _wait_for_verify(catalog, {"type": "recording", "password": PASSWORD})
    assert catalog.drop_pending_prunes("repo1", ["point1"]) == 1
    assert catalog.pending_prunes("repo1") == []
    assert list(Path(str(tmp_path / "catalog.sqlite") + ".credentials").iterdir()) == []
    catalog.close()


OLD_SCHEMA = """
CREATE TABLE pending_log_prunes (
    id INTEGER PRIMARY KEY, repository TEXT NOT NULL, restore_point TEXT NOT NULL, source TEXT,
    writer_type TEXT NOT NULL, writer_config TEXT NOT NULL, metadata TEXT NOT NULL, created TEXT NOT NULL, done TEXT
);
"""


def test_an_older_catalog_loses_its_plaintext_passwords_on_open(tmp_path, recording_writer):
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_SCHEMA)
    config = json.dumps({"type": "recording", "password": PASSWORD})
    with db:
        for point, done in (("old", "2026-01-01T00:00:00Z"), ("point1", None)):
            db.execute(
                "INSERT INTO pending_log_prunes(repository, restore_point, source, writer_type, writer_config,"
                " metadata, created, done) VALUES ('repo1', ?, 'db01', 'recording', ?, '{}', 'now', ?)",
                (point, config, done),
            )
    db.close()
    assert PASSWORD.encode() in _bytes_on_disk(path)

    catalog = Catalog(str(path))
    assert PASSWORD.encode() not in _bytes_on_disk(path)
    assert len(os.listdir(str(path) + ".credentials")) == 1  # only the prune still waiting keeps a copy
    run_pending_prunes(catalog, "repo1", "point1", HostRunner(), lambda *e: None)
    assert recording_writer.seen == [PASSWORD]
    assert os.listdir(str(path) + ".credentials") == []
    catalog.close()


def test_forget_drops_the_credentials_of_its_points(cli, tmp_path):
    from tests.conftest import make_image

    cli.run("init", "--encryption", "none", check=True)
    image = make_image(tmp_path / "disk.img", 1 << 20)
    first = cli.run("backup", str(image), "--name", "disk", "--json", check=True).json()["id"]
    cli.run("backup", str(image), "--name", "disk", check=True)
    catalog = Catalog(cli.env["SUREPOINT_CATALOG"])
    catalog.add_pending_prune("x", first, "disk", "recording", {"password": PASSWORD}, {})
    repo_id = json.loads(cli.run("list", "--json", check=True).stdout)["repository"]
    catalog.add_pending_prune(repo_id, first, "disk", "recording", {"password": PASSWORD}, {})
    catalog.close()
    credentials = Path(cli.env["SUREPOINT_CATALOG"] + ".credentials")
    assert len(list(credentials.iterdir())) == 2
    cli.run("forget", "--keep-last", "1", check=True)
    assert len(list(credentials.iterdir())) == 1  # only the other repository's is left
