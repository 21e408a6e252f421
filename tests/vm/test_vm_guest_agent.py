"""The qemu-guest-agent client: against fake agents (absent, hung, stuck in freeze) and the test VM."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from surepoint.vm.errors import (
    GuestAgentCommandError,
    GuestAgentTimeout,
    GuestAgentUnavailable,
    GuestCommandFailed,
)
from surepoint.vm.guest_agent import GuestAgent


class FakeAgent:
    """A unix socket that plays qemu-guest-agent: answers sync, ignores `hang_on`, records requests."""

    def __init__(self, path: str, hang_on: set[str], answer_sync: bool = True) -> None:
        self.hang_on = hang_on
        self.answer_sync = answer_sync
        self.seen: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._handle(conn, json.loads(line.lstrip(b"\xff")))

    def _handle(self, conn: socket.socket, request: dict) -> None:
        cmd = request["execute"]
        self.seen.append(cmd)
        if cmd == "guest-sync-delimited":
            if self.answer_sync:
                conn.sendall(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
        elif cmd not in self.hang_on:
            conn.sendall(json.dumps({"return": 0, "id": request.get("id")}).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture()
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "qga.sock")


def test_absent_agent(sock_path: str) -> None:
    started = time.monotonic()
    with pytest.raises(GuestAgentUnavailable, match="No such file"):
        GuestAgent(sock_path, timeout=2)
    assert time.monotonic() - started < 1


def test_silent_agent_is_unavailable(sock_path: str) -> None:
    """QEMU accepts on the chardev even when no agent runs in the guest: the sync must time out."""
    fake = FakeAgent(sock_path, hang_on=set(), answer_sync=False)
    try:
        started = time.monotonic()
        with pytest.raises(GuestAgentUnavailable, match="no guest agent answers"):
            GuestAgent(sock_path, timeout=5, sync_timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        fake.close()


def test_freeze_timeout_still_thaws(sock_path: str) -> None:
    fake = FakeAgent(sock_path, hang_on={"guest-fsfreeze-freeze", "guest-ping"})
    try:
        with GuestAgent(sock_path, timeout=2) as agent:
            with pytest.raises(GuestAgentTimeout, match="guest-ping"):
                agent.ping(timeout=0.3)
            with pytest.raises(GuestAgentTimeout, match="guest-fsfreeze-freeze"):
                agent.fsfreeze_freeze(timeout=0.3, thaw_timeout=2)
            assert agent.fsfreeze_status() == 0  # late/stale replies do not confuse later commands
        assert fake.seen[-3:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status"]
    finally:
        fake.close()


# -- against the test VM ------------------------------------------------------------------


@pytest.mark.kvm
def test_ping_and_info(agent: GuestAgent) -> None:
    agent.ping()
    info = agent.info()
    assert info["version"].startswith("7.")
    names = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-exec", "guest-fsfreeze-freeze", "guest-file-open"} <= names


@pytest.mark.kvm
def test_exec(agent: GuestAgent) -> None:
    result = agent.exec(["hostname"], check=True)
    assert result.stdout.strip() == b"surepoint-test"
    # an argument vector: nothing is interpreted by a shell
    result = agent.exec(["echo", "a  b; exit 7", "$HOME"])
    assert result.ok and result.stdout == b"a  b; exit 7 $HOME\n"
    result = agent.exec(["sh", "-c", 'cat; echo "to stderr $X" >&2; exit 3'], input=b"fed in", env={"X": "42"})
    assert (result.exitcode, result.stdout, result.stderr) == (3, b"fed in", b"to stderr 42\n")
    with pytest.raises(GuestCommandFailed, match="exit code 3"):
        agent.exec(["sh", "-c", "exit 3"], check=True)
    with pytest.raises(GuestAgentCommandError):
        agent.exec(["/no/such/program"])
    with pytest.raises(GuestAgentTimeout, match="still runs"):
        agent.exec(["sleep", "30"], timeout=0.5)
    with pytest.raises(ValueError):
        agent.exec("echo hi")  # type: ignore[arg-type]


@pytest.mark.kvm
def test_file_round_trip(agent: GuestAgent) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    agent.write_file("/data/roundtrip.bin", data)
    assert agent.read_file("/data/roundtrip.bin") == data
    digest = agent.exec(["sha256sum", "/data/roundtrip.bin"], check=True).stdout.split()[0].decode()
    assert digest == hashlib.sha256(data).hexdigest()
    agent.exec(["rm", "/data/roundtrip.bin"], check=True)
    with pytest.raises(GuestAgentCommandError):
        agent.file_open("/no/such/dir/file", "r")


@pytest.mark.kvm
def test_fsfreeze_round_trip(agent: GuestAgent) -> None:
    assert agent.fsfreeze_status() == "thawed"
    with agent.frozen(timeout=60) as count:
        assert count >= 2  # / and /data
        assert agent.fsfreeze_status() == "frozen"
    assert agent.fsfreeze_status() == "thawed"
    assert agent.fsfreeze_freeze() >= 2
    assert agent.fsfreeze_thaw() >= 2
    agent.exec(["touch", "/data/after-thaw"], check=True, timeout=30)  # writes work again
