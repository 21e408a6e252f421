"""When sessions run: cron schedules with time zones, "after job X", retries of failed VMs,
concurrency limits, and never two sessions of one job at once.

A trigger (schedule, run-now, after-job, retry) makes a `queued` session, unless the job already
has one queued or running: that check and the insert are one transaction. Each tick starts the
queued sessions whose time has come, as far as the host's and each repository's limits allow.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from surepoint.errors import SurepointError, UsageError
from surepoint.server.config import ServerConfig
from surepoint.server.db import Database, now_iso, parse_iso
from surepoint.server.executor import Executor

ACTIVE = ("queued", "running")
FINAL = ("success", "warning", "failed", "cancelled")


class AlreadyRunning(SurepointError):
    """The job has a session queued or running: it is not started twice."""


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_schedule(schedule: str, timezone: str) -> None:
    """UsageError unless `schedule` is a cron expression (5 fields, or 6 with seconds first) and
    `timezone` a known IANA zone."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {timezone!r} (use an IANA name like Europe/Berlin)") from None
    fields = schedule.split()
    if len(fields) not in (5, 6) or len(schedule) > 200:
        raise UsageError(f"schedule {schedule!r}: a cron expression has 5 fields (or 6, seconds first)")
    try:
        valid = croniter.is_valid(schedule, second_at_beginning=len(fields) == 6)
    except Exception:  # noqa: BLE001 - croniter raises several kinds on odd input
        valid = False
    if not valid:
        raise UsageError(f"schedule {schedule!r} is not a valid cron expression")


def next_run(schedule: str, timezone: str, after: datetime) -> datetime:
    """The first time after `after` (aware) that `schedule` fires, read in `timezone`."""
    tz = ZoneInfo(timezone)
    fields = schedule.split()
    it = croniter(schedule, after.astimezone(tz), second_at_beginning=len(fields) == 6)
    return it.get_next(datetime).astimezone(UTC)


class Scheduler:
    def __init__(
        self,
        db: Database,
        config: ServerConfig,
        executor: Executor,
        on_session_end: Callable[[dict], None] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.executor = executor
        self.on_session_end = on_session_end
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- triggers ---------------------------------------------------------------------------------
    def enqueue(
        self,
        job: dict,
        trigger: str,
        *,
        user: str = "",
        spec: dict | None = None,
        attempt: int = 1,
        not_before: datetime | None = None,
    ) -> int:
        """A queued session of `job`; AlreadyRunning if it has one queued or running."""
        with self.db.transaction() as db:
            active = db.one(
                "SELECT id, state FROM sessions WHERE job_id = ? AND state IN ('queued', 'running') LIMIT 1",
                (job["id"],),
            )
            if active:
                raise AlreadyRunning(f"job {job['name']!r} is already {active['state']} (session {active['id']})")
            session_id = db.insert(
                "INSERT INTO sessions (job_id, job_name, kind, repository, spec, trigger, attempt, state, not_before, "
                "queued, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (
                    job["id"],
                    job["name"],
                    job["kind"],
                    job["repository"],
                    json.dumps(spec) if spec is not None else job["spec"],
                    trigger,
                    attempt,
                    _iso(not_before) if not_before else None,
                    now_iso(),
                    user,
                ),
            )
        self._wake.set()
        return session_id

    def enqueue_action(self, kind: str, repository: str, spec: dict, user: str, label: str) -> int:
        """A session without a job (a restore, a lab verification started by hand)."""
        session_id = self.db.insert(
            "INSERT INTO sessions (job_id, job_name, kind, repository, spec, trigger, state, queued, created_by) "
            "VALUES (NULL, ?, ?, ?, ?, 'manual', 'queued', ?, ?)",
            (label, kind, repository, json.dumps(spec), now_iso(), user),
        )
        self._wake.set()
        return session_id

    def cancel(self, session_id: int) -> str:
        """Cancel a queued or running session; its state afterwards."""
        if self.db.execute(
            "UPDATE sessions SET state = 'cancelled', ended = ?, message = 'cancelled' "
            "WHERE id = ? AND state = 'queued'",
            (now_iso(), session_id),
        ):
            return "cancelled"
        if self.executor.cancel(session_id):
            return "cancelling"
        row = self.db.one("SELECT state FROM sessions WHERE id = ?", (session_id,))
        return row["state"] if row else "unknown"

    def schedule_job(self, job_id: int, now: datetime | None = None) -> None:
        """Set a job's next scheduled run from its cron expression (none without a schedule)."""
        job = self.db.one("SELECT id, schedule, timezone, enabled FROM jobs WHERE id = ?", (job_id,))
        if job is None:
            return
        when = None
        if job["schedule"] and job["enabled"]:
            when = _iso(next_run(job["schedule"], job["timezone"], now or datetime.now(UTC)))
        self.db.execute("UPDATE jobs SET next_run = ? WHERE id = ?", (when, job_id))
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> None:
        """Queue what is due, then start what may start."""
        with self._tick_lock:
            now = now or datetime.now(UTC)
            self._queue_due(now)
            self._start_queued(now)

    def _queue_due(self, now: datetime) -> None:
        due = self.db.query(
            "SELECT * FROM jobs WHERE enabled = 1 AND next_run IS NOT NULL AND next_run <= ?", (_iso(now),)
        )
        for job in due:
            # The next run is counted from now: a server that was down does not replay missed runs.
            self.db.execute(
                "UPDATE jobs SET next_run = ? WHERE id = ?",
                (_iso(next_run(job["schedule"], job["timezone"], now)), job["id"]),
            )
            try:
                self.enqueue(job, "schedule")
            except AlreadyRunning:
                continue

    def _start_queued(self, now: datetime) -> None:
        queued = self.db.query("SELECT id, repository, not_before FROM sessions WHERE state = 'queued' ORDER BY id")
        running = len(self.executor.running())
        per_repo = self.executor.count_by_repository()
        for session in queued:
            if running >= self.config.max_sessions:
                return
            if session["not_before"] and parse_iso(session["not_before"]) > now:
                continue
            repo = self.config.repositories.get(session["repository"])
            if repo is None:
                self.db.execute(
                    "UPDATE sessions SET state = 'failed', ended = ?, message = ? WHERE id = ?",
                    (now_iso(), f"repository {session['repository']!r} is not configured", session["id"]),
                )
                continue
            if per_repo.get(repo.name, 0) >= repo.max_parallel:
                continue
            claimed = self.db.execute(
                "UPDATE sessions SET state = 'starting' WHERE id = ? AND state = 'queued'", (session["id"],)
            )
            if not claimed:
                continue
            self.executor.start(session["id"])
            running += 1
            per_repo[repo.name] = per_repo.get(repo.name, 0) + 1

    def session_finished(self, session_id: int) -> None:
        """After a session: retry its failed VMs, start the jobs that follow it, notify."""
        session = self.db.one("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if session is None:
            return
        job = self.db.one("SELECT * FROM jobs WHERE id = ?", (session["job_id"],)) if session["job_id"] else None
        if job is not None:
            self._retry(job, session)
            if session["state"] in ("success", "warning"):
                for follower in self.db.query("SELECT * FROM jobs WHERE after_job = ? AND enabled = 1", (job["id"],)):
                    try:
                        self.enqueue(follower, f"after:{job['name']}")
                    except AlreadyRunning:
                        continue
        if self.on_session_end is not None:
            self.on_session_end(session)
        self._wake.set()

    def _retry(self, job: dict, session: dict) -> None:
        """A failed VM backup is tried again, only for the VMs that failed, after the job's delay."""
        if job["kind"] != "vm" or session["attempt"] > job["retries"] or session["state"] not in ("failed", "warning"):
            return
        failed = (json.loads(session["result"] or "{}") or {}).get("failed_vms") or []
        if not failed:
            return
        spec = dict(json.loads(session["spec"]), vms=failed, patterns=[])
        when = datetime.now(UTC) + timedelta(seconds=job["retry_delay"])
        try:
            self.enqueue(job, "retry", spec=spec, attempt=session["attempt"] + 1, not_before=when)
        except AlreadyRunning:
            pass

    def prune_sessions(self) -> int:
        """Sessions (and their logs) past the retention period are deleted."""
        cutoff = _iso(datetime.now(UTC) - timedelta(days=self.config.session_retention_days))
        return self.db.execute(
            "DELETE FROM sessions WHERE ended IS NOT NULL AND ended < ? AND state IN ('success', 'warning', "
            "'failed', 'cancelled')",
            (cutoff,),
        )

    def start(self, housekeeping: Callable[[], None] | None = None) -> None:
        def loop() -> None:
            last_housekeeping = 0.0
            while not self._stop.is_set():
                try:
                    self.tick()
                    if housekeeping is not None and datetime.now(UTC).timestamp() - last_housekeeping > 60:
                        last_housekeeping = datetime.now(UTC).timestamp()
                        self.prune_sessions()
                        housekeeping()
                except Exception as exc:  # noqa: BLE001 - the loop must survive a bad job or a busy database
                    print(f"warning: scheduler: {exc!r}", flush=True)
                self._wake.wait(self.config.tick_seconds)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
