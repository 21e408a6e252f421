"""Notifications reach a real SMTP server (aiosmtpd) and a local webhook receiver: a failed
session, a success the job asked for, alerts and the daily summary."""

from __future__ import annotations

import json
import threading
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.server.conftest import ServerProcess, free_port, wait_for


class Mailbox:
    def __init__(self) -> None:
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp():
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, box
    controller.stop()


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            length = int(self.headers["Content-Length"])
            received.append({"type": self.headers["Content-Type"], "body": json.loads(self.rfile.read(length))})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", received
    httpd.shutdown()
    httpd.server_close()


def test_failed_and_successful_sessions_are_mailed_and_posted(tmp_path: Path, smtp, webhook) -> None:
    controller, box = smtp
    url, received = webhook
    server = ServerProcess(
        tmp_path / "server",
        extra_config=f"""
[notifications]
smtp_host = "127.0.0.1"
smtp_port = {controller.port}
mail_from = "backup@example.org"
mail_to = ["ops@example.org"]
webhooks = ["{url}"]
on = ["failed", "warning"]
""",
    )
    server.init_repository()
    server.start()
    try:
        image = tmp_path / "disk.img"
        image.write_bytes(b"data" * 100000)
        with server.client() as api:
            bad = {"name": "broken", "kind": "files", "repository": "main", "spec": {"paths": [str(tmp_path / "gone")]}}
            assert api.post("/jobs", json=bad).status_code == 201
            failed = server.wait_session(api, api.post("/jobs/broken/run").json()["session"])
            assert failed["state"] == "failed"
            good = {
                "name": "good",
                "kind": "files",
                "repository": "main",
                "spec": {"paths": [str(image)]},
                "notify": ["success"],
            }
            assert api.post("/jobs", json=good).status_code == 201
            ok = server.wait_session(api, api.post("/jobs/good/run").json()["session"])
            assert ok["state"] == "success"
        wait_for(lambda: len(box.messages) >= 2 and len(received) >= 2, what="two mails and two webhook calls")
        subjects = sorted(m["Subject"] for _, m in box.messages)
        assert subjects == ["[surepoint] broken: failed", "[surepoint] good: success"]
        mail = next(m for _, m in box.messages if "broken" in m["Subject"])
        assert mail["To"] == "ops@example.org"
        assert "does not exist" in mail.get_payload() or "gone" in mail.get_payload()
        events = {r["body"]["event"]: r for r in received}
        assert set(events) == {"session.failed", "session.success"}
        assert events["session.failed"]["type"] == "application/json"
        assert events["session.failed"]["body"]["session"]["job_name"] == "broken"
        assert events["session.failed"]["body"]["session"]["id"] == failed["id"]
        assert events["session.success"]["body"]["session"]["bytes_read"] == 400000
    finally:
        server.stop()


def test_alerts_and_daily_summary_are_sent_once(tmp_path: Path, smtp, webhook) -> None:
    from surepoint.server.config import NotificationConfig, RepositoryConfig, ServerConfig
    from surepoint.server.service import Service

    controller, box = smtp
    url, received = webhook
    config = ServerConfig(
        state_dir=str(tmp_path / "state"),
        repositories={"main": RepositoryConfig(name="main", location=str(tmp_path / "no-repo-yet"))},
        notifications=NotificationConfig(
            smtp_host="127.0.0.1",
            smtp_port=controller.port,
            mail_to=["ops@example.org"],
            webhooks=[url],
            daily_summary="00:00",
            rpo_hours=24,
        ),
    )
    service = Service(config, say=lambda m: None)
    try:
        service.db.execute(
            "INSERT INTO jobs (name, kind, repository, spec, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            ("web01", "vm", "main", json.dumps({"vms": ["web01"]}), "2026-01-01", "2026-01-01"),
        )
        service.notifier.housekeeping()
        service.notifier.housekeeping()  # a minute later: nothing new
        wait_for(lambda: len(box.messages) >= 2 and len(received) >= 2, what="the alert and the summary")
        subjects = sorted(" ".join(str(m["Subject"]).split()) for _, m in box.messages)  # unfolded
        assert len(subjects) == 2, subjects
        assert subjects[0].startswith("[surepoint] alert: web01 has no good restore point in the last 24 hours")
        assert subjects[1].startswith("[surepoint] daily summary: 0 ok, 0 warning, 0 failed, 1 alert(s)")
        assert {r["body"]["event"] for r in received} == {"alert.stale", "summary"}
    finally:
        service.db.close()
