"""Fixtures for the server tests: a real `surepoint server` process on a free 127.0.0.1 port with its
own state, repository and admin password, and an API client with a token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SUREPOINT

ADMIN_PASSWORD = "admin-password-for-tests"
PASSPHRASE = "server test passphrase"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `surepoint server` with a local repository `main`; start(), kill(), stop()."""

    def __init__(self, base: Path, extra_config: str = "") -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        (base / "admin-password").write_text(ADMIN_PASSWORD + "\n")
        (base / "passphrase").write_text(PASSPHRASE + "\n")
        os.chmod(base / "passphrase", 0o600)
        self.config = base / "server.toml"
        self.config.write_text(
            f"""[server]
port = {self.port}
state_dir = "state"
admin_password_file = "admin-password"
tick_seconds = 0.2

[repositories.main]
location = "repo"
passphrase_file = "passphrase"
{extra_config}
"""
        )
        self.env = dict(os.environ)
        for key in ("SUREPOINT_REPO", "SUREPOINT_PASSPHRASE", "SUREPOINT_PASSPHRASE_FILE", "SUREPOINT_CATALOG"):
            self.env.pop(key, None)
        self.env["SUREPOINT_MOUNT_STATE_DIR"] = str(base / "mount-state")
        self.proc: subprocess.Popen | None = None
        self.log = base / "server.log"
        self._token: str | None = None

    # the repository, through the real CLI
    def cli(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        env = dict(
            self.env,
            SUREPOINT_REPO=str(self.base / "repo"),
            SUREPOINT_PASSPHRASE_FILE=str(self.base / "passphrase"),
            SUREPOINT_CATALOG=str(self.base / "state" / "catalogs" / "main.sqlite"),
            **(env or {}),
        )
        proc = subprocess.run([SUREPOINT, *args], env=env, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"surepoint {' '.join(args)} failed: {proc.stderr}")
        return proc

    def init_repository(self) -> None:
        self.cli("init", "--encryption", "aes-256-gcm")

    def start(self) -> None:
        out = open(self.log, "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [SUREPOINT, "server", "--config", str(self.config)],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            try:
                httpx.get(self.url + "/api/v1/me", timeout=1, verify=False)  # noqa: S501 - only: is it up?
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"server did not come up: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a power cut would: no cleanup at all."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # whatever a browse left mounted
        subprocess.run([SUREPOINT, "umount", "--all"], env=self.env, capture_output=True, timeout=60, check=False)

    def token(self, user: str = "admin") -> str:
        """An API token of admin, made through the console login and the API (as a user would)."""
        assert user == "admin"
        if self._token:
            return self._token
        with httpx.Client(base_url=self.url + "/api/v1", timeout=60, verify=False) as web:  # noqa: S501
            login = web.post("/login", json={"name": "admin", "password": ADMIN_PASSWORD})
            assert login.status_code == 200, login.text
            made = web.post("/tokens", json={"name": "tests"}, headers={"X-CSRF-Token": login.json()["csrf"]})
            assert made.status_code == 201, made.text
        self._token = made.json()["token"]
        return self._token

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.token()}"}, timeout=60
        )

    def wait_session(self, client: httpx.Client, session_id: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            session = client.get(f"/sessions/{session_id}").json()
            if session["state"] not in ("queued", "starting", "running"):
                return session
            time.sleep(0.2)
        raise AssertionError(f"session {session_id} still {session['state']}")


@pytest.fixture
def server(tmp_path: Path):
    srv = ServerProcess(tmp_path / "server")
    srv.init_repository()
    srv.start()
    yield srv
    srv.stop()


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
