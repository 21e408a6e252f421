"""The scheduler of a real server: a job due in seconds runs, a job never runs twice at once, and a
server killed mid-job leaves an interrupted session, a repository that verifies, and a next run
that is incremental."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import sha256_file
from tests.server.conftest import ServerProcess, wait_for

MiB = 1 << 20


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def files_job(name: str, path: Path, **extra) -> dict:
    spec = {"paths": [str(path)], "name": "disk"}
    spec.update(extra.pop("spec", {}))
    return {"name": name, "kind": "files", "repository": "main", "spec": spec, **extra}


def test_scheduled_job_runs_and_never_twice_at_once(server: ServerProcess, tmp_path: Path) -> None:
    image = random_file(tmp_path / "disk.img", 96 * MiB)  # a few seconds of backup on this storage
    with server.client() as api:
        response = api.post("/jobs", json=files_job("every-2s", image, schedule="*/2 * * * * *", spec={"full": True}))
        assert response.status_code == 201, response.text
        first = wait_for(
            lambda: [s for s in api.get("/sessions").json() if s["state"] == "running"], what="a scheduled session"
        )[0]
        assert first["trigger"] == "schedule"
        # while it runs: run-now is refused and the schedule's ticks do not start a second session
        refused = api.post("/jobs/every-2s/run")
        assert refused.status_code == 409
        assert "already running" in refused.json()["detail"]
        while True:
            sessions = api.get("/sessions").json()  # one consistent look at every session
            active = [s for s in sessions if s["state"] in ("queued", "starting", "running")]
            assert len(active) <= 1, active
            if not any(s["id"] == first["id"] for s in active):
                break
            time.sleep(0.3)
        done = server.wait_session(api, first["id"])
        assert done["state"] == "success", done
        assert done["bytes_read"] == 96 * MiB
        # stop the schedule; whatever started meanwhile ends; no two sessions ever overlapped
        job = api.get("/jobs/every-2s").json()
        update = {k: job[k] for k in ("name", "kind", "repository", "spec", "schedule", "timezone")}
        assert api.put("/jobs/every-2s", json=update | {"enabled": False}).status_code == 200
        for s in api.get("/sessions").json():
            server.wait_session(api, s["id"])
        sessions = sorted(api.get("/sessions").json(), key=lambda s: s["id"])
        for a, b in zip(sessions, sessions[1:], strict=False):
            assert a["ended"] <= b["started"], (a, b)
        log = api.get(f"/sessions/{first['id']}/log").json()["lines"]
        assert log[0]["line"].startswith("$ surepoint backup ")


def test_killed_server_marks_session_interrupted_and_next_run_is_incremental(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server")
    server.init_repository()
    server.start()
    try:
        image = random_file(tmp_path / "disk.img", 32 * MiB)
        with server.client() as api:
            assert api.post("/jobs", json=files_job("disk", image)).status_code == 201
            first = server.wait_session(api, api.post("/jobs/disk/run").json()["session"])
            assert first["state"] == "success", first
            base = server.cli("list", "--json").stdout
            base_id = json.loads(base)["restore_points"][0]["id"]

            random_file(image, 96 * MiB)  # new data: the next backup writes for seconds
            session_id = api.post("/jobs/disk/run").json()["session"]

            def backing_up():
                lines = api.get(f"/sessions/{session_id}/log").json()["lines"]
                return any("disk 0" in entry["line"] for entry in lines)

            wait_for(backing_up, what="the backup to be under way", interval=0.05)
        server.kill()
        server.start()
        with server.client() as api:
            killed = api.get(f"/sessions/{session_id}").json()
            assert killed["state"] == "failed"
            assert killed["message"].startswith("interrupted")
            assert "interrupted" in api.get(f"/sessions/{session_id}/log").json()["lines"][-1]["line"]
            verify = server.cli("verify", "--json")
            assert json.loads(verify.stdout)["damaged_chunks"] == 0
            points = json.loads(server.cli("list", "--json").stdout)["restore_points"]
            assert all(p["state"] == "verified" for p in points)
            third = server.wait_session(api, api.post("/jobs/disk/run").json()["session"])
            assert third["state"] == "success", third
        points = json.loads(server.cli("list", "--json").stdout)["restore_points"]
        newest = points[-1]
        assert newest["parent"] == base_id  # incremental on the last committed point
        restored = tmp_path / "restored.img"
        server.cli("restore", newest["id"], "--to", str(restored))
        assert sha256_file(restored) == sha256_file(image)
    finally:
        server.stop()
