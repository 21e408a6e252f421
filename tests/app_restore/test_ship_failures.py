"""One log source failing does not stop the others: each writer's outcome is recorded, the failure is
the exit, and the MariaDB client's own notices never pass for result rows."""

from __future__ import annotations

import pytest

from surepoint.catalog import Catalog
from surepoint.consistency.log_sources import ClosedLog
from surepoint.consistency.mariadb import result_rows
from surepoint.consistency.runner import CommandFailed
from surepoint.jobs.job_file import JobConfig
from surepoint.jobs.log_shipping import _ship
from surepoint.repo.logstore import LogStore
from surepoint.repo.repository import Repository
from surepoint.storage.local import LocalBackend


class GoodSource:
    def __init__(self, tmp_path) -> None:
        self.removed: list[str] = []
        self.logs = []
        for i in (3, 4):
            path = tmp_path / f"00000001000000000000000{i}"
            path.write_bytes(bytes([i]) * 70_000)
            self.logs.append(ClosedLog(path.name, str(path), f"2026-12-01T10:0{i}:00.000000Z"))

    def closed_logs(self):
        return self.logs

    def read(self, logs):
        for log in logs:
            with open(log.path, "rb") as f:
                yield log, f.read()

    def remove_shipped(self, shipped):
        self.removed = [log.file for log in shipped]
        return self.removed


class BrokenSource:
    def closed_logs(self):
        raise CommandFailed("binary logging is off on this server")


def test_a_failing_writer_does_not_stop_the_others(tmp_path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository.create(LocalBackend(str(tmp_path / "repo")), encryption="none", chunk_size=64 << 10)
    catalog = Catalog(str(tmp_path / "catalog.sqlite"))
    good = GoodSource(tmp_path)
    job = JobConfig(name="db01", sources=[], writers=[{"type": "mariadb"}, {"type": "postgresql"}])
    said: list[str] = []
    sources = {"mariadb": lambda config: BrokenSource(), "postgresql": lambda config: good}
    with pytest.raises(CommandFailed, match="binary logging is off"):
        _ship(repo, catalog, job, job.writers, sources, said.append)
    # the writer after the failing one still shipped, and removed only what it stored
    assert [r.file for r in LogStore(repo).list("db01", "postgresql")] == [log.file for log in good.logs]
    assert good.removed == [log.file for log in good.logs]
    assert any(line.startswith("mariadb ship-logs: failed") for line in said)
    assert any(line.startswith("postgresql ship-logs: ok shipped 2") for line in said)


@pytest.mark.parametrize(
    "notice",
    [
        "mariadb: [Warning] World-writable config file '/etc/mysql/my.cnf' is ignored.",
        "/usr/bin/mysql: Deprecated program name. It will be removed in a future release, use 'mariadb' instead",
        "Warning: Using a password on the command line interface can be insecure.",
    ],
)
def test_client_notices_are_not_rows(notice: str) -> None:
    assert result_rows(f"{notice}\nmysql-bin.000007\t342\n") == [["mysql-bin.000007", "342"]]
    with pytest.raises(CommandFailed, match="ERROR 1045"):
        result_rows(f"{notice}\nERROR 1045 (28000): Access denied\n")
