"""The REST API in-process (FastAPI's test client): authentication, roles, audit trail, and bad
payloads of every shape answered with a clear 4xx, never a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surepoint.server import auth
from surepoint.server.app import create_app
from surepoint.server.config import RepositoryConfig, ServerConfig
from surepoint.server.service import Service

ROLES = ("admin", "operator", "restore-operator", "auditor")


class Env:
    def __init__(self, base: Path) -> None:
        config = ServerConfig(
            state_dir=str(base / "state"),
            repositories={"main": RepositoryConfig(name="main", location=str(base / "repo"))},
        )
        self.said: list[str] = []
        self.service = Service(config, say=self.said.append)
        self.service.start = lambda: None  # no scheduler: sessions stay queued
        auth.ensure_admin(self.service.db, None, self.said.append)
        self.tokens = {}
        for role in ROLES:
            user = (
                auth.User(1, "admin", "admin")
                if role == "admin"
                else auth.create_user(self.service.db, f"{role}-user", "a long password 123", role)
            )
            self.tokens[role] = auth.create_token(self.service.db, user, "test")[1]
        self.client = TestClient(create_app(self.service, start=False), raise_server_exceptions=False)

    def as_(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def audit(self) -> list[dict]:
        return self.service.db.query("SELECT * FROM audit ORDER BY id")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    e = Env(tmp_path_factory.mktemp("api"))
    yield e
    e.service.db.close()


JOB = {"name": "web01", "kind": "files", "repository": "main", "spec": {"paths": ["/srv/web01.img"]}}


def test_first_start_prints_a_random_admin_password_once(env: Env) -> None:
    printed = [m for m in env.said if "created user admin with password" in m]
    assert len(printed) == 1
    password = printed[0].split("password: ")[1].split()[0]
    assert len(password) >= 20
    assert auth.login(env.service.db, "admin", password).role == "admin"
    auth.ensure_admin(env.service.db, None, env.said.append)  # second start: nothing new
    assert len([m for m in env.said if "created user admin" in m]) == 1
    hashes = env.service.db.query("SELECT password_hash FROM users")
    assert all(h["password_hash"].startswith("$argon2") for h in hashes)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/sessions"),
        ("POST", "/api/v1/sessions/1/cancel"),
        ("GET", "/api/v1/repositories"),
        ("GET", "/api/v1/audit"),
        ("POST", "/api/v1/lab"),
        ("GET", "/metrics"),
    ],
)
def test_unauthenticated_calls_get_401(env: Env, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sp_not-a-token"}, {"Authorization": "Basic YWRtaW46eA=="}):
        response = env.client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (path, headers, response.text)
        assert "authentication required" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_roles_are_enforced_with_403(env: Env) -> None:
    c = env.client
    assert c.post("/api/v1/jobs", json=JOB, headers=env.as_("auditor")).status_code == 403
    assert c.post("/api/v1/jobs", json=JOB, headers=env.as_("restore-operator")).status_code == 403
    assert c.get("/api/v1/users", headers=env.as_("operator")).status_code == 403
    assert c.get("/api/v1/audit", headers=env.as_("restore-operator")).status_code == 403
    denied = c.post("/api/v1/lab", json={"repository": "main", "targets": ["x:latest"]}, headers=env.as_("auditor"))
    assert denied.status_code == 403
    assert "role auditor may not" in denied.json()["detail"]
    assert c.get("/api/v1/audit", headers=env.as_("auditor")).status_code == 200
    assert c.get("/api/v1/jobs", headers=env.as_("auditor")).status_code == 200


def test_every_mutating_call_is_audited(env: Env) -> None:
    c = env.client
    before = len(env.audit())
    op = env.as_("operator")
    created = c.post("/api/v1/jobs", json=dict(JOB, name="audited"), headers=op)
    assert created.status_code == 201, created.text
    changed = c.put("/api/v1/jobs/audited", json=dict(JOB, name="audited", schedule="0 3 * * *"), headers=op)
    assert changed.status_code == 200, changed.text
    assert changed.json()["next_run"].endswith("T03:00:00.000000Z")
    run = c.post("/api/v1/jobs/audited/run", headers=op)
    assert run.status_code == 202
    again = c.post("/api/v1/jobs/audited/run", headers=op)
    assert again.status_code == 409  # queued already: not started twice
    cancelled = c.post(f"/api/v1/sessions/{run.json()['session']}/cancel", headers=op)
    assert cancelled.json()["state"] == "cancelled"
    assert c.post("/api/v1/jobs", json=JOB, headers=env.as_("auditor")).status_code == 403
    assert c.delete("/api/v1/jobs/audited", headers=op).status_code == 200
    assert c.post("/api/v1/tokens", json={"name": "ci"}, headers=env.as_("auditor")).status_code == 201
    rows = env.audit()[before:]
    actions = [(r["username"], r["action"], r["outcome"]) for r in rows]
    assert actions == [
        ("operator-user", "POST /api/v1/jobs", "ok"),
        ("operator-user", "PUT /api/v1/jobs/audited", "ok"),
        ("operator-user", "POST /api/v1/jobs/audited/run", "ok"),
        ("operator-user", "POST /api/v1/jobs/audited/run", "refused 409"),
        ("operator-user", f"POST /api/v1/sessions/{run.json()['session']}/cancel", "ok"),
        ("auditor-user", "POST /api/v1/jobs", "refused 403"),
        ("operator-user", "DELETE /api/v1/jobs/audited", "ok"),
        ("auditor-user", "POST /api/v1/tokens", "ok"),
    ]
    # the audit trail never holds a secret
    assert not any("sp_" in r["details"] or "password" in r["details"] for r in env.audit())


def test_console_cookie_needs_the_csrf_header(env: Env) -> None:
    c = TestClient(env.client.app, raise_server_exceptions=False)
    admin_password = [m for m in env.said if "password: " in m][0].split("password: ")[1].split()[0]
    login = c.post("/api/v1/login", json={"name": "admin", "password": admin_password})
    assert login.status_code == 200
    assert "httponly" in login.headers["set-cookie"].lower()
    assert "samesite=strict" in login.headers["set-cookie"].lower()
    forged = c.post("/api/v1/jobs", json=dict(JOB, name="csrf"))
    assert forged.status_code == 403
    assert "X-CSRF-Token" in forged.json()["detail"]
    ok = c.post("/api/v1/jobs", json=dict(JOB, name="csrf"), headers={"X-CSRF-Token": login.json()["csrf"]})
    assert ok.status_code == 201
    wrong = c.post("/api/v1/login", json={"name": "admin", "password": "wrong password"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong user name or password"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**JOB, "kind": "backup-everything"}, "kind"),
        ({**JOB, "repository": "elsewhere"}, "unknown repository 'elsewhere'"),
        ({**JOB, "spec": {"paths": []}}, "paths"),
        ({**JOB, "spec": {"paths": ["relative.img"]}}, "paths"),
        ({**JOB, "spec": {"paths": ["/a"], "colour": "red"}}, "colour"),
        ({**JOB, "schedule": "every day"}, "cron expression"),
        ({**JOB, "schedule": "0 2 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({**JOB, "after_job": "nobody"}, "there is no job 'nobody'"),
        ({**JOB, "kind": "retention", "spec": {}}, "at least one keep_"),
        ({**JOB, "retries": 10**30}, "retries"),
    ],
)
def test_bad_jobs_get_a_clear_4xx(env: Env, body: dict, message: str) -> None:
    response = env.client.post("/api/v1/jobs", json=body, headers=env.as_("admin"))
    assert 400 <= response.status_code < 500, response.text
    assert message in response.json()["detail"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
job_like = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values | st.text(max_size=120),
        "kind": st.sampled_from(["files", "vm", "job_file", "verify", "retention", "lab", "x"]) | json_values,
        "repository": st.sampled_from(["main", "other"]) | json_values,
        "spec": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "paths": json_values | st.lists(st.text(max_size=20), max_size=3),
                "vms": json_values,
                "targets": json_values,
                "name": json_values,
                "keep_last": json_values,
                "sample": json_values,
                "restore_point": json_values,
                "to": json_values,
            },
        ),
        "schedule": json_values | st.text(max_size=40),
        "timezone": json_values | st.text(max_size=40),
        "after_job": json_values,
        "retries": json_values,
        "retry_delay": json_values,
        "notify": json_values,
    },
)
ENDPOINTS = [
    ("POST", "/api/v1/jobs"),
    ("PUT", "/api/v1/jobs/web01"),
    ("POST", "/api/v1/restore"),
    ("POST", "/api/v1/lab"),
    ("POST", "/api/v1/users"),
    ("POST", "/api/v1/tokens"),
    ("POST", "/api/v1/login"),
    ("PUT", "/api/v1/users/admin/password"),
]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=job_like | json_values,
    raw=st.none() | st.binary(max_size=40),
)
def test_fuzzed_payloads_never_get_a_500(env: Env, endpoint, body, raw) -> None:
    method, path = endpoint
    headers = env.as_("admin")
    if raw is not None:
        response = env.client.request(method, path, content=raw, headers=headers | {"content-type": "application/json"})
    else:
        response = env.client.request(method, path, json=body, headers=headers)
    assert response.status_code < 500, (path, body, raw, response.text)
    if response.status_code >= 400:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        [
            "/api/v1/sessions",
            "/api/v1/sessions/{x}",
            "/api/v1/sessions/{x}/log",
            "/api/v1/jobs/{x}",
            "/api/v1/repositories/{x}/restore-points",
            "/api/v1/repositories/main/restore-points/{x}/files",
            "/api/v1/audit",
        ]
    ),
    segment=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30),
    query=st.dictionaries(
        st.sampled_from(["limit", "after", "state", "job", "volume", "path", "system"]),
        st.text(max_size=25) | st.integers().map(str),
        max_size=3,
    ),
)
def test_fuzzed_paths_and_queries_never_get_a_500(env: Env, path: str, segment: str, query: dict) -> None:
    from urllib.parse import quote

    url = path.replace("{x}", quote(segment, safe="") or "0")
    response = env.client.get(url, params=query, headers=env.as_("admin"))
    assert response.status_code < 500, (url, query, response.text)


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "https://evil.example/", "/jobs"])
def test_console_login_only_redirects_inside_the_console(env: Env, target: str) -> None:
    c = TestClient(env.client.app, raise_server_exceptions=False, follow_redirects=False)
    password = [m for m in env.said if "password: " in m][0].split("password: ")[1].split()[0]
    response = c.post("/login", data={"name": "admin", "password": password, "next": target})
    assert response.status_code == 303
    assert response.headers["location"] == (target if target == "/jobs" else "/")


@pytest.fixture(scope="module")
def console(env: Env):
    """A logged-in console client and its CSRF token."""
    c = TestClient(env.client.app, raise_server_exceptions=False, follow_redirects=False)
    password = [m for m in env.said if "password: " in m][0].split("password: ")[1].split()[0]
    assert c.post("/login", data={"name": "admin", "password": password}).status_code == 303
    csrf = c.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
    return c, csrf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        [
            "/",
            "/points",
            "/points/{x}/{x}",
            "/points/main/{x}",
            "/points/main/{x}/download",
            "/jobs",
            "/jobs/{x}/edit",
            "/sessions",
            "/sessions/{x}",
            "/audit",
            "/jobs/new",
        ]
    ),  # fmt: skip
    segment=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30) | st.integers().map(str),
    query=st.dictionaries(
        st.sampled_from(["volume", "path", "system", "repository", "job", "browse", "next"]),
        st.text(max_size=25) | st.integers().map(str),
        max_size=3,
    ),
)
def test_fuzzed_console_pages_never_get_a_500(console, path: str, segment: str, query: dict) -> None:
    from urllib.parse import quote

    c, _csrf = console
    url = path.replace("{x}", quote(segment, safe="") or "0")
    response = c.get(url, params=query)
    assert response.status_code < 500, (url, query, response.text[:500])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/jobs/new", "/jobs/1/edit", "/points/main/0/restore", "/points/main/0/lab", "/jobs/1/run"]),
    form=st.dictionaries(
        st.sampled_from(
            [
                "name",
                "kind",
                "repository",
                "targets",
                "point_name",
                "spec_json",
                "schedule",
                "timezone",
                "after_job",
                "retries",
                "retry_delay",
                "enabled",
                "action",
                "to",
                "paths",
                "disk",
                "into_vm",
                "group",
            ]
        ),  # fmt: skip
        st.text(max_size=30) | st.sampled_from(["files", "vm", "main", "disk", "files", "instant", "{}", "on"]),
        max_size=8,
    ),
)
def test_fuzzed_console_forms_never_get_a_500(console, path: str, form: dict) -> None:
    c, csrf = console
    response = c.post(path, data={**form, "csrf": csrf})
    assert response.status_code < 500, (path, form, response.text[:500])


@settings(max_examples=300, deadline=None)
@given(
    form=st.dictionaries(
        st.sampled_from(
            [
                "name",
                "kind",
                "repository",
                "targets",
                "point_name",
                "spec_json",
                "schedule",
                "timezone",
                "after_job",
                "retries",
                "retry_delay",
                "enabled",
                "action",
                "to",
                "paths",
                "disk",
                "into_vm",
                "overwrite",
                "start",
            ]
        ),  # fmt: skip
        st.text(max_size=30)
        | st.sampled_from(
            ["files", "vm", "lab", "main", "disk", "files", "instant", "instant-migrate", "{}", "on", "/srv/x", "0"]
        ),
        max_size=10,
    )
)
def test_console_forms_become_a_spec_or_one_usage_error(form: dict) -> None:
    from surepoint.errors import UsageError
    from surepoint.server.console import job_from_form, restore_spec

    for parse in (job_from_form, lambda f: restore_spec(f, "0123abcd")):
        try:
            parse(form)
        except UsageError as exc:
            assert str(exc) and "\n" not in str(exc)


def test_console_shows_a_lab_report(env: Env, console) -> None:
    from dataclasses import asdict

    from surepoint.lab.checks import CheckResult
    from surepoint.lab.report import LabReport, VmResult

    c, _csrf = console
    vm = VmResult("web01", "verified", "0123abcd", "web01", "2026-11-30T10:00:00Z", "application", outcome="passed")
    vm.boot_seconds = 41.5
    vm.tests = [CheckResult("heartbeat", "heartbeat", "passed", "<b>agent answered</b>", 0.2)]
    report = LabReport("lab-1", "2026-11-30T10:00:00Z", "repo", network={"isolated": True, "namespace": "splab1"})
    report.vms = [vm]
    report.integrity = {"0123abcd": "verified"}
    report.settle()
    result = {"steps": [dict(report.to_dict(), report_files=["/var/lib/x.json"])], "failed_vms": []}
    session_id = env.service.db.insert(
        "INSERT INTO sessions (job_name, kind, repository, spec, trigger, state, queued, result) "
        "VALUES ('lab of web01', 'lab', 'main', '{}', 'manual', 'success', 't', ?)",
        (json.dumps(result),),
    )
    page = c.get(f"/sessions/{session_id}").text
    section = page.split('id="lab-report"')[1].split("</section>")[0]
    assert 'Lab lab-1: <span class="state passed">passed</span>' in section
    assert "isolated namespace splab1" in section
    assert 'heartbeat: <span class="state passed">passed</span>' in section
    assert "41.5 s" in section
    assert "<b>agent answered</b>" not in page  # guest output is escaped, never HTML
    assert asdict(vm)["outcome"] == "passed"


def test_openapi_document_lists_the_api(env: Env) -> None:
    doc = env.client.get("/openapi.json").json()
    assert "/api/v1/jobs" in doc["paths"] and "/api/v1/sessions/{session_id}/cancel" in doc["paths"]
    assert env.client.get("/docs").status_code == 200
    json.dumps(doc)
