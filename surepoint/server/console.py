"""The web console: server-rendered pages (Jinja2, autoescaped) and one small script file.

Login with a user's password opens a session cookie (HttpOnly, SameSite=Strict); every form
that changes something carries the session's CSRF token. Pages call the service, never the
HTTP API, except the live session log, which the script polls from /api/v1. Over 500 lines
because it is one route table: each page is a short handler next to its form parsing.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.background import BackgroundTask

from surepoint import __version__
from surepoint.errors import SurepointError, UsageError
from surepoint.server import auth, jobstore
from surepoint.server.api import COOKIE, HTTPProblem, service
from surepoint.server.auth import OPERATE, RESTORE, User
from surepoint.server.kinds import JOB_KINDS, describe_validation, parse_spec
from surepoint.server.service import LoginThrottled

RowId = Annotated[int, PathParam(ge=1, le=2**62)]
Volume = Annotated[int, Query(ge=0, le=1024)]
templates = Jinja2Templates(directory=os.path.join(os.path.dirname(__file__), "templates"))
router = APIRouter(include_in_schema=False)


def _human(n: float | None) -> str:
    if not isinstance(n, int | float):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(text: str | None) -> str:
    return text[:19].replace("T", " ") if text else ""


templates.env.filters["human"] = _human
templates.env.filters["when"] = _when
templates.env.filters["urlpath"] = lambda s: quote(s, safe="/")
templates.env.filters["q"] = lambda s: quote(str(s), safe="")


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    user = _user(request)
    return templates.TemplateResponse(
        request, "error.html", {"user": user, "status": status, "message": message}, status_code=status
    )


def _user(request: Request) -> User | None:
    cookie = request.cookies.get(COOKIE)
    return auth.user_by_cookie(service(request).db, cookie) if cookie else None


def _require(request: Request, allowed: set[str] | None = None) -> User:
    user = _user(request)
    if user is None:
        raise HTTPProblem(401, "log in first")
    request.state.user = user.name
    if allowed is not None and user.role not in allowed:
        raise HTTPProblem(403, f"role {user.role} may not do this")
    return user


async def _form(request: Request, user: User) -> dict:
    form = await request.form()
    if form.get("csrf") != user.csrf:
        raise HTTPProblem(403, "the form is stale or forged (CSRF token mismatch): reload the page")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _page(request: Request, name: str, user: User, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": user, "version": __version__, **context})


# -- login --------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"user": None, "next": _safe_next(next), "error": None})


def _safe_next(target: str) -> str:
    local = target.startswith("/") and not target.startswith(("//", "/\\")) and len(target) < 2000
    return target if local and target.isprintable() else "/"


@router.post("/login")
async def login(request: Request):
    form = await request.form()
    name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))[:1024]
    request.state.user = name or "(anonymous)"
    svc = service(request)
    try:
        user = svc.login(name, password, request.client.host if request.client else "")
    except auth.AuthError as exc:
        return templates.TemplateResponse(
            request,
            "login.html",
            {"user": None, "next": _safe_next(str(form.get("next", "/"))), "error": str(exc)},
            status_code=429 if isinstance(exc, LoginThrottled) else 401,
        )
    cookie, _csrf = auth.open_web_session(svc.db, user)
    response = RedirectResponse(_safe_next(str(form.get("next", "/"))), status_code=303)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", secure=bool(svc.config.tls_cert))
    return response


@router.post("/logout")
async def logout(request: Request):
    user = _require(request)
    await _form(request, user)
    auth.close_web_session(service(request).db, request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# -- dashboard -------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    since = datetime.now(UTC).timestamp() - 86400
    since_iso = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    sessions = svc.db.query("SELECT * FROM sessions WHERE queued >= ? ORDER BY id DESC LIMIT 200", (since_iso,))
    counts: dict[str, int] = {}
    for s in sessions:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    repos = [svc.repositories.info(name) for name in svc.config.repositories]
    points = [dict(p, repository=r) for r in svc.config.repositories for p in svc.repositories.points(r)]
    attention = [p for p in points if p["state"] in ("damaged", "failed", "unverified")][:50]
    return _page(
        request,
        "dashboard.html",
        user,
        sessions=sessions[:30],
        counts=counts,
        systems=svc.repositories.systems(),
        repositories=repos,
        attention=attention,
        alerts=svc.notifier.alerts(),
    )


# -- systems and restore points ----------------------------------------------------------------------
@router.get("/points", response_class=HTMLResponse)
def points(request: Request, repository: str | None = None, system: str | None = None) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    names = [repository] if repository in svc.config.repositories else list(svc.config.repositories)
    rows = [
        dict(p, repository=r)
        for r in names
        for p in svc.repositories.points(r)
        if system is None or p["name"] == system
    ]
    return _page(request, "points.html", user, points=rows, systems=svc.repositories.systems(), system=system)


@router.get("/points/{repository}/{point_id}", response_class=HTMLResponse)
def point(
    request: Request,
    repository: str,
    point_id: str,
    volume: Volume = 0,
    path: Annotated[str, Query(max_length=4096)] = "/",
) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    if repository not in svc.config.repositories:
        raise HTTPProblem(404, f"no repository {repository!r}")
    data = svc.repositories.point(repository, point_id)
    if data is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in {repository}")
    browse = request.query_params.get("browse") is not None or "path" in request.query_params
    volumes, entries, error = [], [], None
    if browse and user.role in RESTORE:
        try:
            volumes = svc.browser.volumes(repository, point_id)
            if volumes:
                entries = svc.browser.list_dir(repository, point_id, volume, path)
        except SurepointError as exc:
            error = str(exc)
    parent = "/" + "/".join([p for p in path.split("/") if p][:-1])
    return _page(
        request,
        "point.html",
        user,
        repository=repository,
        point=data,
        browse=browse,
        volumes=volumes,
        volume=volume,
        path="/" + "/".join(p for p in path.split("/") if p),
        parent=parent,
        entries=entries,
        error=error,
        may_restore=user.role in RESTORE,
    )


@router.get("/points/{repository}/{point_id}/download")
def download(
    request: Request, repository: str, point_id: str, path: Annotated[str, Query(max_length=4096)], volume: Volume = 0
):
    user = _require(request, RESTORE)
    svc = service(request)
    if svc.repositories.point(repository, point_id) is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in {repository}")
    file_path, filename, tmp = svc.browser.download(repository, point_id, volume, path)
    svc.audit(
        user.name,
        "download",
        f"{repository}/{point_id}",
        {"path": path, "volume": volume},
        request.client.host if request.client else "",
    )
    return FileResponse(
        file_path,
        filename=filename,
        media_type="application/octet-stream",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


@router.post("/points/{repository}/{point_id}/lab")
async def start_lab(request: Request, repository: str, point_id: str):
    user = _require(request, RESTORE)
    form = await _form(request, user)
    svc = service(request)
    if svc.repositories.point(repository, point_id) is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in {repository}")
    spec = {"targets": [point_id], "integrity": True}
    if form.get("group", "").strip():
        spec["group"] = form["group"].strip()
    spec = parse_spec("lab", spec).model_dump(exclude_none=True)
    request.state.audit = {"restore_point": point_id}
    session_id = svc.scheduler.enqueue_action("lab", repository, spec, user.name, f"lab verification of {point_id}")
    return RedirectResponse(f"/sessions/{session_id}", status_code=303)


def restore_spec(form: dict, point_id: str) -> tuple[str, dict]:
    """The restore session a point page's restore form asks for: (kind, spec)."""
    action = form.get("action", "")
    lines = [line.strip() for line in form.get("paths", "").splitlines() if line.strip()]
    overwrite = form.get("overwrite") == "on"
    if action == "disk":
        disk = form.get("disk", "0").strip() or "0"
        if not disk.isdigit() or len(disk) > 4:
            raise UsageError("disk: a disk number is expected")
        data = {"restore_point": point_id, "to": form.get("to", ""), "disk": int(disk), "overwrite": overwrite}
        return "restore", parse_spec("restore", data).model_dump(exclude_none=True)
    if action == "vm":
        data = {"restore_point": point_id, "to": form.get("to", ""), "start": form.get("start") == "on"}
        return "vm_restore", parse_spec("vm_restore", data).model_dump(exclude_none=True)
    if action == "files":
        data = {"restore_point": point_id, "paths": lines, "to": form.get("to", ""), "overwrite": overwrite}
        if form.get("into_vm", "").strip():
            data["into_vm"] = form["into_vm"].strip()
        return "restore_files", parse_spec("restore_files", data).model_dump(exclude_none=True)
    if action in ("instant", "instant-migrate", "instant-discard"):
        data = {"restore_point": point_id, "action": {"instant": "boot"}.get(action, action[len("instant-") :])}
        if action == "instant-migrate":
            data["migrate_to"] = form.get("to", "")
        return "instant", parse_spec("instant", data).model_dump(exclude_none=True)
    raise UsageError(f"unknown restore action {action[:40]!r}")


@router.post("/points/{repository}/{point_id}/restore")
async def start_restore(request: Request, repository: str, point_id: str):
    user = _require(request, RESTORE)
    form = await _form(request, user)
    svc = service(request)
    if svc.repositories.point(repository, point_id) is None:
        raise HTTPProblem(404, f"no restore point {point_id!r} in {repository}")
    kind, spec = restore_spec(form, point_id)
    request.state.audit = {"restore_point": point_id, "kind": kind}
    label = f"{kind.replace('_', ' ')} of {point_id}"
    session_id = svc.scheduler.enqueue_action(kind, repository, spec, user.name, label)
    return RedirectResponse(f"/sessions/{session_id}", status_code=303)


# -- jobs -------------------------------------------------------------------------------------------
@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    rows = [jobstore.public(j, svc.db) for j in jobstore.all_jobs(svc.db)]
    last = {
        r["job_id"]: r
        for r in svc.db.query(
            "SELECT * FROM sessions WHERE id IN (SELECT MAX(id) FROM sessions WHERE job_id IS NOT NULL GROUP BY job_id)"
        )
    }
    return _page(request, "jobs.html", user, jobs=rows, last=last, may_operate=user.role in OPERATE)


def _job_form_defaults(job: dict | None) -> dict:
    if job is None:
        return {
            "name": "",
            "kind": "files",
            "repository": "",
            "targets": "",
            "point_name": "",
            "spec_json": "",
            "schedule": "",
            "timezone": "UTC",
            "after_job": "",
            "enabled": True,
            "retries": 0,
            "retry_delay": 300,
        }
    spec = job["spec"]
    targets = (
        spec.get("paths")
        or (spec.get("vms", []) + spec.get("patterns", []))
        or spec.get("targets")
        or ([spec["job_file"]] if "job_file" in spec else [])
    )
    return {
        "name": job["name"],
        "kind": job["kind"],
        "repository": job["repository"],
        "targets": "\n".join(targets),
        "point_name": spec.get("name", "") if job["kind"] == "files" else "",
        "spec_json": json.dumps(spec, indent=2) if job["kind"] in ("verify", "retention") else "",
        "schedule": job["schedule"] or "",
        "timezone": job["timezone"],
        "after_job": job["after_job"] or "",
        "enabled": job["enabled"],
        "retries": job["retries"],
        "retry_delay": job["retry_delay"],
    }


def job_from_form(form: dict) -> jobstore.JobIn:
    """The job a console form describes: sources or VMs one per line, or a spec in JSON."""
    kind = form.get("kind", "")
    targets = [line.strip() for line in form.get("targets", "").splitlines() if line.strip()]
    spec: dict
    if form.get("spec_json", "").strip():
        try:
            spec = json.loads(form["spec_json"])
        except ValueError as exc:
            raise UsageError(f"spec: not valid JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise UsageError("spec: a JSON object is expected")
    elif kind == "files":
        spec = {"paths": targets}
        if form.get("point_name", "").strip():
            spec["name"] = form["point_name"].strip()
    elif kind == "vm":
        patterns = [t for t in targets if any(c in t for c in "*?[")]
        spec = {"vms": [t for t in targets if t not in patterns], "patterns": patterns}
    elif kind == "lab":
        spec = {"targets": targets}
    elif kind == "job_file":
        spec = {"job_file": targets[0] if targets else ""}
    else:
        spec = {}

    def number(key: str, default: int) -> int:
        text = form.get(key, "").strip()
        if not text:
            return default
        if not text.isdigit() or len(text) > 9:
            raise UsageError(f"{key.replace('_', ' ')}: a whole number is expected")
        return int(text)

    try:
        return jobstore.JobIn(
            name=form.get("name", "").strip(),
            kind=kind,
            repository=form.get("repository", ""),
            spec=spec,
            schedule=form.get("schedule", "").strip() or None,
            timezone=form.get("timezone", "").strip() or "UTC",
            after_job=form.get("after_job", "").strip() or None,
            enabled=form.get("enabled") == "on",
            retries=number("retries", 0),
            retry_delay=number("retry_delay", 300),
        )
    except ValidationError as exc:
        raise UsageError(describe_validation(exc.errors())) from None


def _editor(request: Request, user: User, form: dict, job_id: int | None, error: str | None, status: int = 200):
    svc = service(request)
    return templates.TemplateResponse(
        request,
        "job_edit.html",
        {
            "user": user,
            "version": __version__,
            "form": form,
            "job_id": job_id,
            "error": error,
            "kinds": list(JOB_KINDS),
            "repositories": list(svc.config.repositories),
            "jobs": [j["name"] for j in jobstore.all_jobs(svc.db) if j["id"] != job_id],
        },
        status_code=status,
    )


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(request: Request) -> HTMLResponse:
    user = _require(request, OPERATE)
    form = _job_form_defaults(None)
    form["repository"] = next(iter(service(request).config.repositories), "")
    return _editor(request, user, form, None, None)


@router.get("/jobs/{job_id}/edit", response_class=HTMLResponse)
def edit_job(request: Request, job_id: RowId) -> HTMLResponse:
    user = _require(request, OPERATE)
    svc = service(request)
    job = jobstore.get(svc.db, job_id)
    if job is None:
        raise HTTPProblem(404, f"no job {job_id}")
    return _editor(request, user, _job_form_defaults(jobstore.public(job, svc.db)), job_id, None)


@router.post("/jobs/new")
async def create_job(request: Request):
    user = _require(request, OPERATE)
    form = await _form(request, user)
    svc = service(request)
    try:
        job_id = jobstore.create(svc.db, svc.config, job_from_form(form))
    except UsageError as exc:
        return _editor(request, user, dict(form, enabled=form.get("enabled") == "on"), None, str(exc), 400)
    request.state.audit = {"job": form.get("name")}
    svc.scheduler.schedule_job(job_id)
    return RedirectResponse("/jobs", status_code=303)


@router.post("/jobs/{job_id}/edit")
async def save_job(request: Request, job_id: RowId):
    user = _require(request, OPERATE)
    form = await _form(request, user)
    svc = service(request)
    if jobstore.get(svc.db, job_id) is None:
        raise HTTPProblem(404, f"no job {job_id}")
    try:
        jobstore.update(svc.db, svc.config, job_id, job_from_form(form))
    except UsageError as exc:
        return _editor(request, user, dict(form, enabled=form.get("enabled") == "on"), job_id, str(exc), 400)
    request.state.audit = {"job": form.get("name")}
    svc.scheduler.schedule_job(job_id)
    return RedirectResponse("/jobs", status_code=303)


@router.post("/jobs/{job_id}/run")
async def run_job(request: Request, job_id: RowId):
    user = _require(request, OPERATE)
    await _form(request, user)
    svc = service(request)
    job = jobstore.get(svc.db, job_id)
    if job is None:
        raise HTTPProblem(404, f"no job {job_id}")
    session_id = svc.scheduler.enqueue(job, "manual", user=user.name)
    return RedirectResponse(f"/sessions/{session_id}", status_code=303)


@router.post("/jobs/{job_id}/delete")
async def delete_job(request: Request, job_id: RowId):
    user = _require(request, OPERATE)
    await _form(request, user)
    service(request).db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    return RedirectResponse("/jobs", status_code=303)


# -- sessions ---------------------------------------------------------------------------------------
@router.get("/sessions", response_class=HTMLResponse)
def sessions(request: Request, job: str | None = None) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    if job:
        rows = svc.db.query("SELECT * FROM sessions WHERE job_name = ? ORDER BY id DESC LIMIT 200", (job[:100],))
    else:
        rows = svc.db.query("SELECT * FROM sessions ORDER BY id DESC LIMIT 200")
    return _page(request, "sessions.html", user, sessions=rows, job=job)


@router.get("/sessions/{session_id}", response_class=HTMLResponse)
def session_page(request: Request, session_id: RowId) -> HTMLResponse:
    user = _require(request)
    svc = service(request)
    row = svc.db.one("SELECT * FROM sessions WHERE id = ?", (session_id,))
    if row is None:
        raise HTTPProblem(404, f"no session {session_id}")
    result = json.loads(row["result"]) if row["result"] else None
    lab = None
    if row["kind"] == "lab" and row["state"] not in ("queued", "starting", "running"):
        steps = (result or {}).get("steps") or [None]
        lab = steps[-1] if isinstance(steps[-1], dict) else {}
    lines = svc.db.query("SELECT id, time, line FROM session_log WHERE session_id = ? ORDER BY id", (session_id,))
    return _page(
        request,
        "session.html",
        user,
        session=row,
        result=json.dumps(result, indent=2) if result else "",
        lab=lab,
        lines=lines,
        may_operate=user.role in OPERATE,
    )


@router.post("/sessions/{session_id}/cancel")
async def cancel(request: Request, session_id: RowId):
    user = _require(request, OPERATE)
    await _form(request, user)
    service(request).scheduler.cancel(session_id)
    return RedirectResponse(f"/sessions/{session_id}", status_code=303)


# -- audit ------------------------------------------------------------------------------------------
@router.get("/audit", response_class=HTMLResponse)
def audit(request: Request) -> HTMLResponse:
    user = _require(request, {"admin", "auditor"})
    rows = service(request).db.query("SELECT * FROM audit ORDER BY id DESC LIMIT 500")
    return _page(request, "audit.html", user, rows=rows)
