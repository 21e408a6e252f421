"""The REST API under /api/v1 (OpenAPI at /docs), and /metrics.

Authentication: `Authorization: Bearer <token>` (API tokens) or the console's session cookie
(then a mutating call also needs the X-CSRF-Token header). 401 without valid credentials, 403
for a role that may not do it. Every mutating call is written to the audit trail by the
middleware in app.py, allowed or not.
"""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from surepoint.errors import SurepointError, UsageError
from surepoint.server import auth, jobstore
from surepoint.server.auth import ADMIN, OPERATE, READ, RESTORE, User
from surepoint.server.kinds import ACTION_KINDS, parse_spec
from surepoint.server.metrics import render
from surepoint.server.service import LoginThrottled, Service

COOKIE = "sp_session"


class HTTPProblem(SurepointError):
    """An API answer other than success, with its status code."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def service(request: Request) -> Service:
    return request.app.state.service


def authenticate(request: Request) -> User | None:
    svc = service(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return auth.user_by_token(svc.db, token.strip())
    cookie = request.cookies.get(COOKIE)
    return auth.user_by_cookie(svc.db, cookie) if cookie else None


def role(allowed: set[str]):
    """A dependency: the authenticated user, if their role is in `allowed`."""

    def check(request: Request) -> User:
        user = authenticate(request)
        if user is None:
            raise HTTPProblem(401, "authentication required: log in or send Authorization: Bearer <token>")
        request.state.user = user.name
        if user.csrf is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("x-csrf-token", "")
            if sent != user.csrf:
                raise HTTPProblem(403, "missing or wrong X-CSRF-Token header for a console session")
        if user.role not in allowed:
            raise HTTPProblem(403, f"role {user.role} may not do this (needs {' or '.join(sorted(allowed))})")
        return user

    return check


Reader = Annotated[User, Depends(role(READ))]
Restorer = Annotated[User, Depends(role(RESTORE))]
Operator = Annotated[User, Depends(role(OPERATE))]
Admin = Annotated[User, Depends(role(ADMIN))]
Svc = Annotated[Service, Depends(service)]

router = APIRouter(prefix="/api/v1")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class UserIn(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=12, max_length=1024)]
    role: Literal["admin", "operator", "restore-operator", "auditor"]


class PasswordIn(Strict):
    password: Annotated[str, Field(min_length=12, max_length=1024)]


class TokenIn(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]


class ActionIn(Strict):
    kind: Literal["restore", "vm_restore", "restore_files", "instant"]
    repository: Annotated[str, Field(min_length=1, max_length=100)]
    spec: dict


class LabIn(Strict):
    repository: Annotated[str, Field(min_length=1, max_length=100)]
    targets: Annotated[list[str], Field(min_length=1, max_length=64)]
    group: Annotated[str, Field(max_length=4096)] | None = None
    integrity: bool = True


def _remote(request: Request) -> str:
    return request.client.host if request.client else ""


# -- login ---------------------------------------------------------------------------------------
@router.post("/login")
def login(body: LoginIn, request: Request, response: Response, svc: Svc) -> dict:
    request.state.user = body.name
    try:
        user = svc.login(body.name, body.password, _remote(request))
    except LoginThrottled as exc:
        raise HTTPProblem(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except auth.AuthError as exc:
        raise HTTPProblem(401, str(exc)) from None
    cookie, csrf = auth.open_web_session(svc.db, user)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", secure=bool(svc.config.tls_cert))
    return {"name": user.name, "role": user.role, "csrf": csrf}


@router.get("/me")
def me(user: Reader) -> dict:
    return {"name": user.name, "role": user.role}


# -- users and tokens --------------------------------------------------------------------------------
@router.get("/users")
def list_users(user: Admin, svc: Svc) -> list[dict]:
    return auth.users(svc.db)


@router.post("/users", status_code=201)
def add_user(body: UserIn, user: Admin, svc: Svc) -> dict:
    created = auth.create_user(svc.db, body.name, body.password, body.role)
    return {"id": created.id, "name": created.name, "role": created.role}


@router.put("/users/{name}/password")
def change_password(name: Annotated[str, PathParam(max_length=64)], body: PasswordIn, user: Reader, svc: Svc) -> dict:
    if user.name != name and user.role != "admin":
        raise HTTPProblem(403, "only an admin may change another user's password")
    row = svc.db.one("SELECT id FROM users WHERE name = ?", (name,))
    if row is None:
        raise HTTPProblem(404, f"no user {name!r}")
    auth.set_password(svc.db, row["id"], body.password)
    return {"name": name, "changed": True}


@router.get("/tokens")
def list_tokens(user: Reader, svc: Svc) -> list[dict]:
    return auth.tokens(svc.db, None if user.role == "admin" else user)


@router.post("/tokens", status_code=201)
def add_token(body: TokenIn, user: Reader, svc: Svc) -> dict:
    token_id, token = auth.create_token(svc.db, user, body.name)
    return {"id": token_id, "name": body.name, "token": token}


@router.delete("/tokens/{token_id}")
def remove_token(token_id: Annotated[int, PathParam(ge=1, le=2**62)], user: Reader, svc: Svc) -> dict:
    if not auth.delete_token(svc.db, token_id, user):
        raise HTTPProblem(404, f"no token {token_id} of yours")
    return {"deleted": token_id}


# -- repositories, restore points, files ------------------------------------------------------------------
def _repo(svc: Service, name: str) -> str:
    if name not in svc.config.repositories:
        raise HTTPProblem(404, f"no repository {name!r}")
    return name


@router.get("/repositories")
def repositories(user: Reader, svc: Svc) -> list[dict]:
    return [svc.repositories.info(name) for name in svc.config.repositories]


@router.get("/repositories/{name}/restore-points")
def restore_points(name: str, user: Reader, svc: Svc, system: str | None = None) -> list[dict]:
    points = svc.repositories.points(_repo(svc, name))
    return [p for p in points if system is None or p["name"] == system]


@router.get("/repositories/{name}/restore-points/{point_id}")
def restore_point(name: str, point_id: str, user: Reader, svc: Svc) -> dict:
    point = svc.repositories.point(_repo(svc, name), point_id)
    if point is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in repository {name}")
    return point


def _point(svc: Service, name: str, point_id: str) -> str:
    if svc.repositories.point(_repo(svc, name), point_id) is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in repository {name}")
    return point_id


@router.get("/repositories/{name}/restore-points/{point_id}/volumes")
def volumes(name: str, point_id: str, user: Restorer, svc: Svc) -> list[dict]:
    return svc.browser.volumes(name, _point(svc, name, point_id))


@router.get("/repositories/{name}/restore-points/{point_id}/files")
def files(
    name: str,
    point_id: str,
    user: Restorer,
    svc: Svc,
    volume: Annotated[int, Query(ge=0, le=1024)] = 0,
    path: Annotated[str, Query(max_length=4096)] = "/",
) -> list[dict]:
    return svc.browser.list_dir(name, _point(svc, name, point_id), volume, path)


@router.get("/repositories/{name}/restore-points/{point_id}/download")
def download(
    name: str,
    point_id: str,
    request: Request,
    user: Restorer,
    svc: Svc,
    path: Annotated[str, Query(min_length=1, max_length=4096)],
    volume: Annotated[int, Query(ge=0, le=1024)] = 0,
) -> FileResponse:
    file_path, filename, tmp = svc.browser.download(name, _point(svc, name, point_id), volume, path)
    svc.audit(user.name, "download", f"{name}/{point_id}", {"path": path, "volume": volume}, _remote(request))
    return FileResponse(
        file_path,
        filename=filename,
        media_type="application/octet-stream",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


@router.get("/repositories/{name}/events")
def events(
    name: str,
    user: Reader,
    svc: Svc,
    restore_point: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[dict]:
    from dataclasses import asdict

    from surepoint.catalog import Catalog
    from surepoint.server.repositories import catalog_path

    repo_config = svc.config.repository(_repo(svc, name))
    info = svc.repositories.info(name)
    if "id" not in info:
        raise HTTPProblem(409, info.get("error", f"repository {name} cannot be opened"))
    catalog = Catalog(catalog_path(svc.config, repo_config))
    try:
        return [asdict(e) for e in catalog.events(info["id"], restore_point, limit)]
    finally:
        catalog.close()


@router.get("/systems")
def systems(user: Reader, svc: Svc) -> list[dict]:
    """Every backed-up system (VM or disk set) with its last and last good restore point, and its RPO."""
    return svc.repositories.systems()


@router.get("/alerts")
def alerts(user: Reader, svc: Svc) -> list[dict]:
    return svc.notifier.alerts()


# -- jobs ---------------------------------------------------------------------------------------------
def _job(svc: Service, ref: str) -> dict:
    row = jobstore.find(svc.db, ref) if len(ref) <= 100 else None
    if row is None:
        raise HTTPProblem(404, f"no job {ref!r}")
    return row


@router.get("/jobs")
def list_jobs(user: Reader, svc: Svc) -> list[dict]:
    return [jobstore.public(j, svc.db) for j in jobstore.all_jobs(svc.db)]


@router.post("/jobs", status_code=201)
def create_job(body: jobstore.JobIn, user: Operator, svc: Svc) -> dict:
    job_id = jobstore.create(svc.db, svc.config, body)
    svc.scheduler.schedule_job(job_id)
    return jobstore.public(jobstore.get(svc.db, job_id), svc.db)


@router.get("/jobs/{ref}")
def get_job(ref: str, user: Reader, svc: Svc) -> dict:
    return jobstore.public(_job(svc, ref), svc.db)


@router.put("/jobs/{ref}")
def update_job(ref: str, body: jobstore.JobIn, user: Operator, svc: Svc) -> dict:
    job = _job(svc, ref)
    jobstore.update(svc.db, svc.config, job["id"], body)
    svc.scheduler.schedule_job(job["id"])
    return jobstore.public(jobstore.get(svc.db, job["id"]), svc.db)


@router.delete("/jobs/{ref}")
def delete_job(ref: str, user: Operator, svc: Svc) -> dict:
    job = _job(svc, ref)
    svc.db.execute("DELETE FROM jobs WHERE id = ?", (job["id"],))
    return {"deleted": job["name"]}


@router.post("/jobs/{ref}/run", status_code=202)
def run_job(ref: str, user: Operator, svc: Svc) -> dict:
    job = _job(svc, ref)
    session_id = svc.scheduler.enqueue(job, "manual", user=user.name)
    return {"session": session_id, "job": job["name"], "state": "queued"}


# -- sessions ---------------------------------------------------------------------------------------------
SESSION_COLUMNS = (
    "id, job_id, job_name, kind, repository, trigger, attempt, state, queued, started, ended, exit_code, message, "
    "bytes_read, bytes_stored, consistency, created_by"
)


def session_public(row: dict) -> dict:
    data = dict(row)
    if "result" in data:
        data["result"] = json.loads(data["result"]) if data["result"] else None
    if "spec" in data:
        data["spec"] = json.loads(data["spec"])
    return data


@router.get("/sessions")
def list_sessions(
    user: Reader,
    svc: Svc,
    job: Annotated[str | None, Query(max_length=100)] = None,
    state: Literal["queued", "running", "success", "warning", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict]:
    sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1"
    params: list = []
    if job is not None:
        sql += " AND job_name = ?"
        params.append(_job(svc, job)["name"])
    if state is not None:
        sql += " AND state = ?"
        params.append(state)
    return svc.db.query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))


def _session(svc: Service, session_id: int) -> dict:
    row = svc.db.one("SELECT * FROM sessions WHERE id = ?", (session_id,))
    if row is None:
        raise HTTPProblem(404, f"no session {session_id}")
    return row


@router.get("/sessions/{session_id}")
def get_session(session_id: Annotated[int, PathParam(ge=1, le=2**62)], user: Reader, svc: Svc) -> dict:
    return session_public(_session(svc, session_id))


@router.get("/sessions/{session_id}/log")
def session_log(
    session_id: Annotated[int, PathParam(ge=1, le=2**62)],
    user: Reader,
    svc: Svc,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    row = _session(svc, session_id)
    lines = svc.db.query(
        "SELECT id, time, line FROM session_log WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?",
        (session_id, after, limit),
    )
    return {"session": session_id, "state": row["state"], "lines": lines}


@router.post("/sessions/{session_id}/cancel", status_code=202)
def cancel_session(session_id: Annotated[int, PathParam(ge=1, le=2**62)], user: Operator, svc: Svc) -> dict:
    row = _session(svc, session_id)
    if row["state"] not in ("queued", "running", "starting"):
        raise HTTPProblem(409, f"session {session_id} has already ended ({row['state']})")
    return {"session": session_id, "state": svc.scheduler.cancel(session_id)}


# -- restore actions and lab verification --------------------------------------------------------------------
@router.post("/restore", status_code=202)
def restore(body: ActionIn, user: Restorer, svc: Svc) -> dict:
    _repo(svc, body.repository)
    spec = parse_spec(body.kind, body.spec)
    if body.kind not in ACTION_KINDS:
        raise UsageError(f"unknown restore kind {body.kind!r}")
    label = f"{body.kind.replace('_', ' ')} of {spec.restore_point}"  # type: ignore[attr-defined]
    session_id = svc.scheduler.enqueue_action(
        body.kind, body.repository, spec.model_dump(exclude_none=True), user.name, label
    )
    return {"session": session_id, "state": "queued"}


@router.post("/lab", status_code=202)
def lab(body: LabIn, user: Restorer, svc: Svc) -> dict:
    _repo(svc, body.repository)
    spec = parse_spec("lab", body.model_dump(exclude={"repository"}, exclude_none=True))
    label = "lab verification of " + ", ".join(spec.targets)  # type: ignore[attr-defined]
    session_id = svc.scheduler.enqueue_action(
        "lab", body.repository, spec.model_dump(exclude_none=True), user.name, label
    )
    return {"session": session_id, "state": "queued"}


# -- audit and metrics ---------------------------------------------------------------------------------------
@router.get("/audit")
def audit_trail(
    user: Annotated[User, Depends(role({"admin", "auditor"}))],
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
) -> list[dict]:
    rows = svc.db.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
    for r in rows:
        r["details"] = json.loads(r["details"] or "{}")
    return rows


metrics_router = APIRouter()


@metrics_router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, svc: Svc) -> PlainTextResponse:
    if not svc.config.metrics_public:
        role(READ)(request)
    text = render(svc.db, svc.repositories, list(svc.config.repositories))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
