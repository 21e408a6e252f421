"""Password guessing slows to a stop: failed logins are throttled per (name, address) and per address."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from surepoint.server import auth
from surepoint.server.throttle import LoginThrottle
from tests.server.test_api import Env


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pair_is_refused_after_the_limit_until_the_window_passes() -> None:
    clock = Clock()
    throttle = LoginThrottle(pair_limit=3, address_limit=10, window=60, clock=clock)
    for _ in range(3):
        assert throttle.wait_seconds("alice", "10.0.0.1") == 0
        throttle.failed("alice", "10.0.0.1")
        clock.now += 1
    assert 55 < throttle.wait_seconds("alice", "10.0.0.1") <= 60
    # the same name from another address, and another name from this address, may still try
    assert throttle.wait_seconds("alice", "10.0.0.2") == 0
    assert throttle.wait_seconds("bob", "10.0.0.1") == 0
    clock.now += 60
    assert throttle.wait_seconds("alice", "10.0.0.1") == 0


def test_one_address_cannot_walk_through_many_names() -> None:
    clock = Clock()
    throttle = LoginThrottle(pair_limit=3, address_limit=5, window=60, clock=clock)
    for i in range(5):
        throttle.failed(f"user{i}", "10.0.0.9")
    assert throttle.wait_seconds("somebody-new", "10.0.0.9") > 0
    assert throttle.wait_seconds("somebody-new", "10.0.0.8") == 0


def test_success_clears_the_pair_but_not_the_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(pair_limit=3, address_limit=4, window=60, clock=clock)
    throttle.failed("alice", "a")
    throttle.failed("alice", "a")
    throttle.succeeded("alice", "a")
    throttle.failed("alice", "a")
    throttle.failed("alice", "a")
    assert throttle.wait_seconds("alice", "a") > 0  # four failures from one address
    assert throttle.wait_seconds("alice", "b") == 0


def test_api_and_console_refuse_guessing_even_with_the_right_password(tmp_path: Path) -> None:
    env = Env(tmp_path)
    try:
        auth.create_user(env.service.db, "carol", "carol's long password", "operator")
        c = TestClient(env.client.app, raise_server_exceptions=False, follow_redirects=False)
        for _ in range(5):
            wrong = c.post("/api/v1/login", json={"name": "carol", "password": "guess guess guess"})
            assert wrong.status_code == 401
        right = c.post("/api/v1/login", json={"name": "carol", "password": "carol's long password"})
        assert right.status_code == 429
        assert int(right.headers["retry-after"]) > 0
        assert "too many failed logins" in right.json()["detail"]
        assert "set-cookie" not in right.headers
        page = c.post("/login", data={"name": "carol", "password": "carol's long password"})
        assert page.status_code == 429 and "too many failed logins" in page.text
        refused = [r for r in env.audit() if r["action"] == "POST /api/v1/login" and r["outcome"] == "refused 429"]
        assert refused and all("carol's long password" not in str(dict(r)) for r in env.audit())
        # other users from the same client are not locked out by carol's guesser
        admin_password = [m for m in env.said if "password: " in m][0].split("password: ")[1].split()[0]
        assert c.post("/api/v1/login", json={"name": "admin", "password": admin_password}).status_code == 200
    finally:
        env.service.db.close()
