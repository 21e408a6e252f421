"""Notifications: e-mail over SMTP and JSON webhooks, for finished sessions (per the outcomes the
job or the config chose), a daily summary, and alerts for stale and unverified restore points.

Each alert and summary is sent once per day and subject (the `notices` table remembers), so a
server restarted ten times does not send ten summaries.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import threading
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from zoneinfo import ZoneInfo

import httpx

from surepoint.server.config import NotificationConfig, ServerConfig
from surepoint.server.db import Database, now_iso, parse_iso
from surepoint.server.kinds import JOB_KINDS
from surepoint.server.repositories import Repositories

TIMEOUT = 15.0


class Notifier:
    def __init__(self, db: Database, config: ServerConfig, repositories: Repositories, log=print) -> None:
        self.db = db
        self.config = config
        self.settings: NotificationConfig = config.notifications
        self.repositories = repositories
        self.log = log

    # -- delivery -------------------------------------------------------------------------------
    def send(self, event: str, subject: str, text: str, payload: dict) -> None:
        """E-mail and webhooks, each in the background; failures are logged, never raised."""
        threading.Thread(target=self._deliver, args=(event, subject, text, payload), daemon=True).start()

    def _deliver(self, event: str, subject: str, text: str, payload: dict) -> None:
        if self.settings.smtp_host and self.settings.mail_to:
            try:
                self._mail(subject, text)
            except (OSError, smtplib.SMTPException) as exc:
                self.log(f"warning: e-mail about {event} not sent: {exc}")
        body = {"event": event, "subject": subject, "time": now_iso(), **payload}
        for url in self.settings.webhooks:
            try:
                response = httpx.post(url, json=body, timeout=TIMEOUT)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                self.log(f"warning: webhook {url} about {event} failed: {exc}")

    def _mail(self, subject: str, text: str) -> None:
        s = self.settings
        message = EmailMessage()
        message["From"] = s.mail_from
        message["To"] = ", ".join(s.mail_to)
        message["Subject"] = subject
        message.set_content(text)
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=TIMEOUT) as smtp:
            if s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_user:
                password = ""
                if s.smtp_password_file:
                    with open(s.smtp_password_file) as f:
                        password = f.read().strip()
                smtp.login(s.smtp_user, password)
            smtp.send_message(message)

    # -- what is sent -------------------------------------------------------------------------------
    def session_ended(self, session: dict) -> None:
        """Called after every session: notify when its outcome is one the job (or the config) asks for."""
        outcomes = self.settings.on
        if session["job_id"]:
            job = self.db.one("SELECT notify FROM jobs WHERE id = ?", (session["job_id"],))
            if job and job["notify"]:
                outcomes = json.loads(job["notify"])
        if session["state"] not in outcomes:
            return
        subject = f"[surepoint] {session['job_name']}: {session['state']}"
        text = (
            f"Session {session['id']} of {session['job_name']} ({session['kind']}) ended: {session['state']}\n"
            f"started {session['started']}, ended {session['ended']}\n"
            f"read {session['bytes_read']} bytes, stored {session['bytes_stored']} bytes\n"
        )
        if session["message"]:
            text += f"message: {session['message']}\n"
        tail = self.db.query(
            "SELECT line FROM session_log WHERE session_id = ? ORDER BY id DESC LIMIT 20", (session["id"],)
        )
        text += "\nlast log lines:\n" + "\n".join(r["line"] for r in reversed(tail))
        payload = {
            "session": {
                k: session[k]
                for k in ("id", "job_id", "job_name", "kind", "repository", "state", "started", "ended", "message")
            }
            | {"bytes_read": session["bytes_read"], "bytes_stored": session["bytes_stored"]}
        }
        self.send(f"session.{session['state']}", subject, text, payload)

    def _once(self, key: str) -> bool:
        """True the first time `key` is asked for (then remembered)."""
        with self.db.transaction() as db:
            if db.one("SELECT key FROM notices WHERE key = ?", (key,)):
                return False
            db.execute("INSERT INTO notices (key, time) VALUES (?, ?)", (key, now_iso()))
            return True

    def alerts(self) -> list[dict]:
        """Protected systems with no recent restore point, and old restore points still unverified."""
        found = []
        protected = self._protected()
        systems = {(s["repository"], s["name"]): s for s in self.repositories.systems()}
        for repo, name in sorted(protected):
            system = systems.get((repo, name))
            rpo = system["rpo_hours"] if system else None
            if rpo is None or rpo > self.settings.rpo_hours:
                found.append(
                    {
                        "alert": "stale",
                        "repository": repo,
                        "name": name,
                        "message": f"{name} has no good restore point in the last {self.settings.rpo_hours:g} hours"
                        + (f" (newest is {rpo:.1f} hours old)" if rpo is not None else " (none at all)"),
                    }
                )
        limit = datetime.now(UTC) - timedelta(hours=self.settings.unverified_hours)
        for repo in self.config.repositories:
            for p in self.repositories.points(repo):
                if p["state"] == "unverified" and parse_iso(p["created"]) < limit:
                    found.append(
                        {
                            "alert": "unverified",
                            "repository": repo,
                            "name": p["name"],
                            "restore_point": p["id"],
                            "message": f"restore point {p['id']} of {p['name']} ({p['created'][:10]}) "
                            f"is not verified after {self.settings.unverified_hours:g} hours",
                        }
                    )
        return found

    def _protected(self) -> set[tuple[str, str]]:
        names = set()
        for job in self.db.query("SELECT kind, repository, spec FROM jobs WHERE enabled = 1"):
            cls = JOB_KINDS.get(job["kind"])
            if cls is None:
                continue
            try:
                spec = cls.model_validate(json.loads(job["spec"]))
            except ValueError:
                continue
            names.update((job["repository"], n) for n in spec.protects())
        return names

    def housekeeping(self, now: datetime | None = None) -> None:
        """Called every minute: alerts once a day each, and the daily summary at its time."""
        now = now or datetime.now(UTC)
        day = now.strftime("%Y-%m-%d")
        for alert in self.alerts():
            key = f"alert:{alert['alert']}:{alert['repository']}:{alert.get('restore_point') or alert['name']}:{day}"
            if self._once(key):
                self.send(f"alert.{alert['alert']}", f"[surepoint] alert: {alert['message']}", alert["message"], alert)
        if self.settings.daily_summary:
            local = now.astimezone(ZoneInfo(self.config.timezone))
            if local.strftime("%H:%M") >= self.settings.daily_summary and self._once(f"summary:{local:%Y-%m-%d}"):
                self.send_summary(now)

    def summary(self, now: datetime | None = None) -> dict:
        now = now or datetime.now(UTC)
        since = (now - timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows = self.db.query("SELECT state, COUNT(*) AS n FROM sessions WHERE queued >= ? GROUP BY state", (since,))
        failed = self.db.query(
            "SELECT id, job_name, message FROM sessions WHERE queued >= ? AND state = 'failed' ORDER BY id", (since,)
        )
        return {"sessions": {r["state"]: int(r["n"]) for r in rows}, "failed": failed, "alerts": self.alerts()}

    def send_summary(self, now: datetime | None = None) -> None:
        data = self.summary(now)
        lines = ["Sessions in the last 24 hours:"]
        lines += [f"  {state}: {n}" for state, n in sorted(data["sessions"].items())] or ["  none"]
        if data["failed"]:
            lines.append("Failed:")
            lines += [f"  session {f['id']} {f['job_name']}: {f['message']}" for f in data["failed"]]
        if data["alerts"]:
            lines.append("Alerts:")
            lines += [f"  {a['message']}" for a in data["alerts"]]
        counts = data["sessions"]
        subject = (
            f"[surepoint] daily summary: {counts.get('success', 0)} ok, {counts.get('warning', 0)} warning, "
            f"{counts.get('failed', 0)} failed, {len(data['alerts'])} alert(s)"
        )
        self.send("summary", subject, "\n".join(lines) + "\n", data)
