"""Scheduling rules on the database, without processes: concurrency limits per host and per
repository, retries of only the failed VMs after a delay, jobs after jobs, session retention."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from surepoint.server.config import RepositoryConfig, ServerConfig
from surepoint.server.db import now_iso, open_database
from surepoint.server.scheduler import AlreadyRunning, Scheduler


class RecordingExecutor:
    """Starts nothing: marks sessions running and remembers the order (the executor's contract)."""

    def __init__(self, db) -> None:
        self.db = db
        self.started: list[int] = []

    def running(self) -> list[int]:
        return [r["id"] for r in self.db.query("SELECT id FROM sessions WHERE state = 'running'")]

    def count_by_repository(self) -> dict[str, int]:
        rows = self.db.query("SELECT repository, COUNT(*) AS n FROM sessions WHERE state = 'running' GROUP BY 1")
        return {r["repository"]: r["n"] for r in rows}

    def start(self, session_id: int) -> None:
        self.db.execute("UPDATE sessions SET state = 'running', started = ? WHERE id = ?", (now_iso(), session_id))
        self.started.append(session_id)

    def cancel(self, session_id: int, reason: str = "cancelled") -> bool:
        return False

    def finish(self, session_id: int, state: str, result: dict | None = None) -> None:
        self.db.execute(
            "UPDATE sessions SET state = ?, ended = ?, result = ? WHERE id = ?",
            (state, now_iso(), json.dumps(result or {}), session_id),
        )


@pytest.fixture
def rig(tmp_path: Path):
    config = ServerConfig(
        state_dir=str(tmp_path),
        max_sessions=3,
        repositories={
            "a": RepositoryConfig(name="a", location="/a", max_parallel=1),
            "b": RepositoryConfig(name="b", location="/b", max_parallel=2),
        },
    )
    db = open_database(str(tmp_path / "server.sqlite"))
    executor = RecordingExecutor(db)
    ended: list[dict] = []
    scheduler = Scheduler(db, config, executor, on_session_end=ended.append)
    yield db, scheduler, executor, ended
    db.close()


def add_job(db, name: str, repository: str = "a", kind: str = "files", **columns) -> dict:
    spec = columns.pop("spec", {"paths": [f"/{name}.img"]})
    fields = {"name": name, "kind": kind, "repository": repository, "spec": json.dumps(spec), "created": "t",
              "updated": "t", **columns}  # fmt: skip
    db.insert(
        f"INSERT INTO jobs ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)})", tuple(fields.values())
    )
    return db.one("SELECT * FROM jobs WHERE name = ?", (name,))


def test_limits_per_repository_and_host(rig) -> None:
    db, scheduler, executor, _ = rig
    jobs = [add_job(db, f"a{i}", "a") for i in range(2)] + [add_job(db, f"b{i}", "b") for i in range(4)]
    ids = [scheduler.enqueue(job, "manual") for job in jobs]
    scheduler.tick()
    # repository a: 1 at once; b: 2 at once; the host: 3 at once
    assert executor.started == [ids[0], ids[2], ids[3]]
    executor.finish(ids[0], "success")
    scheduler.tick()
    assert executor.started[-1] == ids[1]
    executor.finish(ids[2], "success")
    executor.finish(ids[3], "success")
    scheduler.tick()
    assert executor.started[-2:] == [ids[4], ids[5]]


def test_a_job_is_never_queued_twice(rig) -> None:
    db, scheduler, executor, _ = rig
    job = add_job(db, "once", schedule="* * * * * *", next_run="2000-01-01T00:00:00.000000Z")
    first = scheduler.enqueue(job, "manual")
    with pytest.raises(AlreadyRunning, match="already queued"):
        scheduler.enqueue(job, "manual")
    scheduler.tick()  # due by schedule, but queued already: skipped
    scheduler.tick()
    assert db.one("SELECT COUNT(*) AS n FROM sessions")["n"] == 1
    assert executor.started == [first]
    with pytest.raises(AlreadyRunning, match="already running"):
        scheduler.enqueue(job, "manual")


def test_failed_vms_only_are_retried_after_the_delay(rig) -> None:
    db, scheduler, executor, ended = rig
    job = add_job(db, "vms", kind="vm", spec={"vms": ["web01", "db01", "mail"]}, retries=2, retry_delay=600)
    first = scheduler.enqueue(job, "schedule")
    scheduler.tick()
    executor.finish(first, "failed", {"failed_vms": ["db01"]})
    scheduler.session_finished(first)
    retry = db.one("SELECT * FROM sessions WHERE id != ?", (first,))
    assert json.loads(retry["spec"])["vms"] == ["db01"]
    assert (retry["trigger"], retry["attempt"], retry["state"]) == ("retry", 2, "queued")
    scheduler.tick()
    assert executor.started == [first]  # not before its time
    scheduler.tick(datetime.now(UTC) + timedelta(seconds=601))
    assert executor.started == [first, retry["id"]]
    executor.finish(retry["id"], "failed", {"failed_vms": ["db01"]})
    scheduler.session_finished(retry["id"])
    third = db.one("SELECT * FROM sessions WHERE attempt = 3")
    scheduler.tick(datetime.now(UTC) + timedelta(seconds=1300))
    executor.finish(third["id"], "failed", {"failed_vms": ["db01"]})
    scheduler.session_finished(third["id"])
    assert db.one("SELECT COUNT(*) AS n FROM sessions")["n"] == 3  # retries = 2: no fourth attempt
    assert [s["id"] for s in ended] == [first, retry["id"], third["id"]]


def test_jobs_after_jobs_and_session_retention(rig) -> None:
    db, scheduler, executor, _ = rig
    first = add_job(db, "backup")
    after = add_job(db, "verify-after", kind="verify", spec={})
    db.execute("UPDATE jobs SET after_job = ? WHERE id = ?", (first["id"], after["id"]))
    s1 = scheduler.enqueue(first, "manual")
    scheduler.tick()
    executor.finish(s1, "failed")
    scheduler.session_finished(s1)
    assert db.one("SELECT COUNT(*) AS n FROM sessions WHERE job_name = 'verify-after'")["n"] == 0
    s2 = scheduler.enqueue(first, "manual")
    scheduler.tick()
    executor.finish(s2, "success")
    scheduler.session_finished(s2)
    follower = db.one("SELECT * FROM sessions WHERE job_name = 'verify-after'")
    assert follower["trigger"] == "after:backup"
    db.execute("INSERT INTO session_log (session_id, time, line) VALUES (?, 't', 'old line')", (s1,))
    db.execute("UPDATE sessions SET ended = '2000-01-01T00:00:00.000000Z' WHERE id = ?", (s1,))
    assert scheduler.prune_sessions() == 1
    assert db.one("SELECT COUNT(*) AS n FROM session_log WHERE session_id = ?", (s1,))["n"] == 0
    assert db.one("SELECT id FROM sessions WHERE id = ?", (s2,))


def test_vm_patterns_expand_when_the_session_starts(tmp_path: Path) -> None:
    from surepoint.errors import UsageError
    from surepoint.server.kinds import parse_spec

    inventory = tmp_path / "vms.toml"
    inventory.write_text(
        "".join(f'[vm.{n}]\nqmp = "/run/{n}.qmp"\n' for n in ("srvtest-web1", "srvtest-web2", "srvtest-db1"))
    )
    config = ServerConfig(state_dir=str(tmp_path), repositories={"a": RepositoryConfig(name="a", location="/a")})
    spec = parse_spec("vm", {"patterns": ["srvtest-web*"], "vms": ["mail"], "inventory": str(inventory)})
    spec.check(config, "a")
    [argv], _env = spec.plan(config, "a")
    assert argv[:5] == ["backup", "vm", "mail", "srvtest-web1", "srvtest-web2"]
    assert argv[argv.index("--inventory") + 1] == str(inventory)
    nothing = parse_spec("vm", {"patterns": ["srvtest-none-*"], "inventory": str(inventory)})
    nothing.check(config, "a")  # a job may name VMs that are not there yet
    with pytest.raises(UsageError, match="no VM matches srvtest-none-"):
        nothing.plan(config, "a")
    with pytest.raises(UsageError, match="name VMs"):
        parse_spec("vm", {"parallel": 2})
