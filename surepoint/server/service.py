"""The running server's parts wired together: database, repositories, executor, scheduler,
notifier, file browser. The API and the console call into this; it knows nothing of HTTP."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

from surepoint.server import auth
from surepoint.server.browse import Browser
from surepoint.server.config import ServerConfig
from surepoint.server.db import Database, open_database
from surepoint.server.executor import Executor
from surepoint.server.notify import Notifier
from surepoint.server.repositories import Repositories
from surepoint.server.scheduler import Scheduler
from surepoint.server.throttle import LoginThrottle


class LoginThrottled(auth.AuthError):
    """Too many failed logins from this address (for this name): refused without checking."""

    def __init__(self, wait: float) -> None:
        self.retry_after = max(1, int(wait + 0.999))
        super().__init__(f"too many failed logins; try again in {self.retry_after} s")


class Service:
    def __init__(self, config: ServerConfig, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.db: Database = open_database(config.database_url)
        self.repositories = Repositories(config)
        self.notifier = Notifier(self.db, config, self.repositories, log=say)
        self.executor = Executor(self.db, config, on_finished=self._session_finished)
        self.scheduler = Scheduler(self.db, config, self.executor, on_session_end=self.notifier.session_ended)
        self.browser = Browser(config, self.executor.env_for)
        self.throttle = LoginThrottle()
        self._started = False
        self._lock = threading.Lock()

    def _session_finished(self, session_id: int) -> None:
        self.repositories.invalidate()  # new restore points or states
        self.scheduler.session_finished(session_id)

    def start(self) -> None:
        """First-start admin, interrupted sessions, every job's next run, then the scheduler loop."""
        with self._lock:
            if self._started:
                return
            self._started = True
        auth.ensure_admin(self.db, self.config.admin_password_file, self.say)
        for session_id in self.executor.recover_interrupted():
            self.say(f"session {session_id} was running when the server stopped: marked failed (interrupted)")
        for job in self.db.query("SELECT id FROM jobs"):
            self.scheduler.schedule_job(job["id"])
        self.scheduler.start(housekeeping=self._housekeeping)

    def _housekeeping(self) -> None:
        self.browser.unmount_idle()
        self.notifier.housekeeping()

    def stop(self) -> None:
        self.scheduler.stop()
        self.executor.stop()
        self.browser.unmount_all()
        self.db.close()

    def login(self, name: str, password: str, remote: str) -> auth.User:
        """A password login, throttled per (name, address) and per address (the audit trail records
        every attempt through the server's middleware)."""
        wait = self.throttle.wait_seconds(name, remote)
        if wait > 0:
            raise LoginThrottled(wait)
        try:
            user = auth.login(self.db, name, password)
        except auth.AuthError:
            self.throttle.failed(name, remote)
            raise
        self.throttle.succeeded(name, remote)
        return user

    def audit(
        self,
        user: str,
        action: str,
        target: str = "",
        details: dict | None = None,
        remote: str = "",
        outcome: str = "ok",
    ) -> None:
        auth.audit(self.db, user, action, target, json.dumps(details or {}, sort_keys=True), remote, outcome)
