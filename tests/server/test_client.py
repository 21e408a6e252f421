"""`surepoint --server URL jobs/sessions ...` against a real server: run a job and follow it, a job
that runs after another, cancel a running session, /metrics, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import SUREPOINT
from tests.server.conftest import ServerProcess, wait_for

MiB = 1 << 20


def client(server: ServerProcess, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = dict(server.env, SUREPOINT_TOKEN=token if token is not None else server.token())
    proc = subprocess.run(
        [SUREPOINT, "--server", server.url, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def files_job(name: str, path: Path, **extra) -> dict:
    return {"name": name, "kind": "files", "repository": "main", "spec": {"paths": [str(path)]}, **extra}


@pytest.fixture
def server(tmp_path: Path):
    """A server with a second repository, `offsite`, with its own passphrase (for a copy job)."""
    srv = ServerProcess(
        tmp_path / "server",
        extra_config='[repositories.offsite]\nlocation = "offsite"\npassphrase_file = "offsite-passphrase"\n',
    )
    (srv.base / "offsite-passphrase").write_text("another passphrase\n")
    srv.init_repository()
    env = dict(srv.env, SUREPOINT_PASSPHRASE="another passphrase")
    subprocess.run([SUREPOINT, "--repo", str(srv.base / "offsite"), "init"], env=env, check=True, capture_output=True)
    srv.start()
    yield srv
    srv.stop()


def test_client_runs_jobs_follows_sessions_and_cancels(server: ServerProcess, tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(2 * MiB))
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(1 * MiB))
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    with server.client() as api:
        assert api.post("/jobs", json=files_job("first", small)).status_code == 201
        assert api.post("/jobs", json=files_job("second", other, after_job="first")).status_code == 201
        assert api.post("/jobs", json=files_job("big", big)).status_code == 201

        made = subprocess.run(
            [SUREPOINT, "server", "--config", str(server.config), "--create-token", "cli"],
            env=server.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0 and made.stdout.startswith("sp_"), made.stderr
        listed = client(server, "jobs", "list", "--json", token=made.stdout.strip())
        assert listed.returncode == 0, listed.stderr
        assert [j["name"] for j in json.loads(listed.stdout)] == ["big", "first", "second"]

        run = client(server, "jobs", "run", "first", "--wait")
        assert run.returncode == 0, run.stderr
        assert "$ surepoint backup" in run.stderr and "success" in run.stdout

        # "second" runs after "first" by itself
        follower = wait_for(
            lambda: [s for s in api.get("/sessions", params={"job": "second"}).json()], what="the follower"
        )[0]
        assert follower["trigger"] == "after:first"
        assert server.wait_session(api, follower["id"])["state"] == "success"

        sessions = json.loads(client(server, "sessions", "list", "--json").stdout)
        assert {s["job_name"] for s in sessions} == {"first", "second"}
        shown = client(server, "sessions", "show", str(follower["id"]), "--log")
        assert shown.returncode == 0 and "$ surepoint backup" in shown.stdout

        # cancel a running session: SIGTERM to its process group, nothing committed, repository intact
        started = json.loads(client(server, "jobs", "run", "big", "--json").stdout)
        session_id = started["session"]
        wait_for(
            lambda: any("disk 0" in x["line"] for x in api.get(f"/sessions/{session_id}/log").json()["lines"]),
            what="the backup to be under way",
            interval=0.05,
        )
        assert api.post(f"/sessions/{session_id}/cancel").json()["state"] == "cancelling"
        assert server.wait_session(api, session_id)["state"] == "cancelled"
        ended = client(server, "sessions", "cancel", str(session_id))
        assert ended.returncode == 2
        assert ended.stderr.strip() == f"error: server: session {session_id} has already ended (cancelled) (HTTP 409)"
        names = {p["name"] for p in json.loads(server.cli("list", "--json").stdout)["restore_points"]}
        assert names == {"small.img", "other.img"}
        assert json.loads(server.cli("verify", "--json").stdout)["damaged_chunks"] == 0

        metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.token()}"})
        assert metrics.status_code == 200
        assert 'surepoint_job_last_success_timestamp_seconds{job="first"}' in metrics.text
        assert 'surepoint_restore_points{repository="main",name="small.img"} 1' in metrics.text
        assert 'surepoint_sessions{state="cancelled"} 1' in metrics.text
        assert httpx.get(server.url + "/metrics").status_code == 401

    # a copy job sends the restore points to the other repository
    with server.client() as api:
        copy_job = {"name": "offsite", "kind": "copy", "repository": "main", "spec": {"to": "offsite"}}
        assert api.post("/jobs", json=copy_job).status_code == 201, copy_job
        copied = server.wait_session(api, api.post("/jobs/offsite/run").json()["session"])
        assert copied["state"] == "success", copied
    offsite = server.cli(
        "--repo", str(server.base / "offsite"), "list", "--json", env={"SUREPOINT_PASSPHRASE": "another passphrase"}
    )
    assert {p["name"] for p in json.loads(offsite.stdout)["restore_points"]} == {"small.img", "other.img"}

    # mistakes: one line and exit code 2
    missing = client(server, "jobs", "run", "nosuch")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: server: no job 'nosuch' (HTTP 404)"
    no_token = client(server, "jobs", "list", token="")
    assert no_token.returncode == 2 and "SUREPOINT_TOKEN" in no_token.stderr
    bad_token = client(server, "jobs", "list", token="sp_wrong")
    assert bad_token.returncode == 1 and "authentication required" in bad_token.stderr
