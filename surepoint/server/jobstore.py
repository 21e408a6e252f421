"""Job definitions: validated, stored, listed. A job is a kind with its spec, a repository, and
when it runs (a cron schedule in a time zone, after another job, or only by hand)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from surepoint.errors import UsageError
from surepoint.server.config import ServerConfig
from surepoint.server.db import Database, now_iso
from surepoint.server.kinds import JOB_KINDS, parse_spec
from surepoint.server.scheduler import check_schedule

Outcome = Literal["success", "warning", "failed", "cancelled"]


class JobIn(BaseModel):
    """A job as the API and the console accept it."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")]
    kind: Literal["files", "vm", "job_file", "verify", "retention", "lab", "copy"]
    repository: Annotated[str, Field(min_length=1, max_length=100)]
    spec: dict
    schedule: Annotated[str, Field(max_length=200)] | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    after_job: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    enabled: bool = True
    retries: Annotated[int, Field(ge=0, le=10)] = 0
    retry_delay: Annotated[int, Field(ge=0, le=86400)] = 300
    notify: list[Outcome] | None = None


def public(row: dict, db: Database) -> dict:
    """A stored job as the API shows it."""
    after = db.one("SELECT name FROM jobs WHERE id = ?", (row["after_job"],)) if row["after_job"] else None
    return {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "repository": row["repository"],
        "spec": json.loads(row["spec"]),
        "schedule": row["schedule"],
        "timezone": row["timezone"],
        "after_job": after["name"] if after else None,
        "enabled": bool(row["enabled"]),
        "retries": row["retries"],
        "retry_delay": row["retry_delay"],
        "notify": json.loads(row["notify"]) if row["notify"] else None,
        "next_run": row["next_run"],
        "created": row["created"],
        "updated": row["updated"],
    }


def _validate(db: Database, config: ServerConfig, job: JobIn, job_id: int | None) -> tuple[str, int | None]:
    if job.kind not in JOB_KINDS:
        raise UsageError(f"unknown job kind {job.kind!r}")
    config.repository(job.repository)
    spec = parse_spec(job.kind, job.spec)
    spec.check(config, job.repository)
    schedule = (job.schedule or "").strip() or None
    if schedule:
        check_schedule(schedule, job.timezone)
    else:
        check_schedule("0 0 * * *", job.timezone)
    after_id = None
    if job.after_job:
        after = db.one("SELECT id FROM jobs WHERE name = ?", (job.after_job,))
        if after is None:
            raise UsageError(f"after_job: there is no job {job.after_job!r}")
        if job_id is not None and after["id"] == job_id:
            raise UsageError("after_job: a job cannot follow itself")
        after_id = after["id"]
    existing = db.one("SELECT id FROM jobs WHERE name = ?", (job.name,))
    if existing and existing["id"] != job_id:
        raise UsageError(f"a job named {job.name!r} already exists")
    return json.dumps(spec.model_dump(exclude_none=True)), after_id


def create(db: Database, config: ServerConfig, job: JobIn) -> int:
    spec, after_id = _validate(db, config, job, None)
    now = now_iso()
    return db.insert(
        "INSERT INTO jobs (name, kind, repository, spec, schedule, timezone, after_job, enabled, retries, retry_delay, "
        "notify, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.name,
            job.kind,
            job.repository,
            spec,
            (job.schedule or "").strip() or None,
            job.timezone,
            after_id,
            int(job.enabled),
            job.retries,
            job.retry_delay,
            json.dumps(job.notify) if job.notify is not None else None,
            now,
            now,
        ),
    )


def update(db: Database, config: ServerConfig, job_id: int, job: JobIn) -> None:
    spec, after_id = _validate(db, config, job, job_id)
    db.execute(
        "UPDATE jobs SET name = ?, kind = ?, repository = ?, spec = ?, schedule = ?, timezone = ?, after_job = ?, "
        "enabled = ?, retries = ?, retry_delay = ?, notify = ?, updated = ? WHERE id = ?",
        (
            job.name,
            job.kind,
            job.repository,
            spec,
            (job.schedule or "").strip() or None,
            job.timezone,
            after_id,
            int(job.enabled),
            job.retries,
            job.retry_delay,
            json.dumps(job.notify) if job.notify is not None else None,
            now_iso(),
            job_id,
        ),
    )


def get(db: Database, job_id: int) -> dict | None:
    return db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))


def find(db: Database, ref: str) -> dict | None:
    """A job by id or by name."""
    if ref.isdigit() and len(ref) < 18:
        row = get(db, int(ref))
        if row:
            return row
    return db.one("SELECT * FROM jobs WHERE name = ?", (ref,))


def all_jobs(db: Database) -> list[dict]:
    return db.query("SELECT * FROM jobs ORDER BY name")
