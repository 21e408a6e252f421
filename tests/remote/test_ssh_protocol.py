"""The ssh:// backend and `surepoint serve` through a real sshd: object operations, and what append-only refuses.

The refusals are tried with raw protocol messages written by the test itself, so they show what
the server enforces whatever a (modified) client sends.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from surepoint.errors import SurepointError
from surepoint.storage.backend import ObjectNotFound
from surepoint.storage.ssh import LIST_PAGE, RefusedByServer, SshBackend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def full(sshd, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SUREPOINT_SSH_COMMAND", sshd.env()["SUREPOINT_SSH_COMMAND"])
    monkeypatch.setenv("SUREPOINT_REMOTE_PATH", sshd.env()["SUREPOINT_REMOTE_PATH"])
    backend = SshBackend(sshd.url(tmp_path / "repo"), create=True)
    yield backend
    backend.close()


def test_objects_over_ssh(full: SshBackend, tmp_path: Path):
    assert not full.append_only
    full.put("chunks/ab/one", b"first", durable=False)
    full.put("indexes/x.0", os.urandom(300_000))
    full.sync()
    assert full.get("chunks/ab/one") == b"first"
    assert (tmp_path / "repo" / "chunks" / "ab" / "one").read_bytes() == b"first"
    assert full.exists("chunks/ab/one") and not full.exists("chunks/ab/two")
    assert full.stat("indexes/x.0").size == 300_000
    assert sorted(i.name for i in full.list("")) == ["chunks/ab/one", "indexes/x.0"]
    assert [i.name for i in full.list("chunks/")] == ["chunks/ab/one"]
    assert full.touch("chunks/ab/one") and not full.touch("chunks/ab/two")
    full.rename("chunks/ab/one", "trash/one")
    assert full.get("trash/one") == b"first"
    full.delete("trash/one")
    for call in (lambda: full.get("trash/one"), lambda: full.stat("x"), lambda: full.delete("x")):
        with pytest.raises(ObjectNotFound):
            call()
    many = [f"chunks/cd/{i:05d}" for i in range(LIST_PAGE + 3)]  # more than one page of a listing
    for name in many[:3]:
        full.put(name, b"", durable=False)
    (tmp_path / "repo" / "chunks" / "cd").mkdir(exist_ok=True)
    for name in many[3:]:
        (tmp_path / "repo" / name).write_bytes(b"")
    assert sorted(i.name for i in full.list("chunks/cd/")) == many


def test_connection_errors_are_one_clear_error(sshd, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SUREPOINT_SSH_COMMAND", sshd.env()["SUREPOINT_SSH_COMMAND"])
    monkeypatch.setenv("SUREPOINT_REMOTE_PATH", sshd.env()["SUREPOINT_REMOTE_PATH"])
    with pytest.raises(SurepointError, match="no repository"):
        SshBackend(sshd.url(tmp_path / "missing"))
    with pytest.raises(SurepointError, match="Permission denied"):
        SshBackend(f"ssh://nobody-here@127.0.0.1:{sshd.port}/srv/repo")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SurepointError, match="not empty"):
        SshBackend(sshd.url(tmp_path / "full"), create=True)


class RawClient:
    """Speaks the frames of docs/offsite.md by hand through ssh, with the append-only key."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        command = shlex.split(env["SUREPOINT_SSH_COMMAND"])
        # The client asks for another path and full access; the forced command decides.
        command += ["-p", str(port), "root@127.0.0.1", "surepoint serve /"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, header: dict, body: bytes = b"") -> tuple[dict, bytes]:
        raw = json.dumps(header).encode()
        self.send_raw(struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(body)) + body)
        return self.reply()

    def reply(self) -> tuple[dict, bytes]:
        (size,) = struct.unpack(">I", self.proc.stdout.read(4))
        header = json.loads(self.proc.stdout.read(size))
        (size,) = struct.unpack(">I", self.proc.stdout.read(4))
        return header, self.proc.stdout.read(size)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_append_only_server_refuses_changes(sshd, tmp_path: Path):
    root = tmp_path / "offsite"
    env = sshd.append_only_client(root)
    client = RawClient(env, sshd.port)
    try:
        hello, _ = client.request({"op": "hello", "version": 1, "create": True})
        assert hello["ok"] and hello["append_only"] and hello["root"] == str(root)

        def ok(header, body=b""):
            reply, data = client.request(header, body)
            assert reply["ok"], reply
            return reply, data

        def refused(header, body=b"", code="refused"):
            reply, _ = client.request(header, body)
            assert not reply["ok"] and reply["error"] == code, reply
            return reply["message"]

        ok({"op": "put", "name": "config"}, b"{}")
        ok({"op": "put", "name": "restorepoints/aaaa"}, b"manifest")
        ok({"op": "put", "name": "indexes/aaaa.0"}, b"index")
        ok({"op": "put", "name": "chunks/00/00ff"}, b"chunk")
        assert "append-only" in refused({"op": "put", "name": "config"}, b"evil")
        assert "overwritten" in refused({"op": "put", "name": "restorepoints/aaaa"}, b"evil")
        refused({"op": "put", "name": "indexes/aaaa.0"}, b"evil")
        # A chunk is content-addressed: putting its name again keeps the stored one.
        assert ok({"op": "put", "name": "chunks/00/00ff"}, b"evil")[0].get("kept")
        for name in ("restorepoints/aaaa", "indexes/aaaa.0", "chunks/00/00ff", "config"):
            assert "cannot be deleted" in refused({"op": "delete", "name": name})
        assert "cannot be moved" in refused({"op": "rename", "name": "chunks/00/00ff", "new_name": "trash/00ff"})
        refused({"op": "rename", "name": "restorepoints/aaaa", "new_name": "restorepoints/bbbb"})
        refused({"op": "put", "name": "trash/00ff"}, b"x")
        refused({"op": "put", "name": "elsewhere"}, b"x")
        refused({"op": "put", "name": "../escape"}, b"x", code="bad_request")
        refused({"op": "get", "name": "/etc/passwd"}, code="bad_request")
        refused({"op": "get", "name": "chunks/../../x"}, code="bad_request")
        refused({"op": "format_disk"}, code="bad_request")
        # Its own lock: created, refreshed, removed. Someone else's lock: untouchable.
        ok({"op": "put", "name": "locks/mine"}, b"1")
        ok({"op": "put", "name": "locks/mine"}, b"2")
        ok({"op": "delete", "name": "locks/mine"})
        (root / "locks").mkdir(exist_ok=True)
        (root / "locks" / "servers").write_text("gc lock of the server")
        refused({"op": "put", "name": "locks/servers"}, b"x")
        refused({"op": "delete", "name": "locks/servers"})
        assert ok({"op": "touch", "name": "chunks/00/00ff"})[0]["exists"]
        assert ok({"op": "get", "name": "restorepoints/aaaa"})[1] == b"manifest"
        # A frame that is not a message ends the session with an error.
        client.send_raw(struct.pack(">I", 5) + b"nojs!" + struct.pack(">I", 0))
        reply, _ = client.reply()
        assert not reply["ok"] and reply["error"] == "bad_request"
    finally:
        client.close()
    assert (root / "config").read_bytes() == b"{}"
    assert (root / "restorepoints" / "aaaa").read_bytes() == b"manifest"
    assert (root / "indexes" / "aaaa.0").read_bytes() == b"index"
    assert (root / "chunks" / "00" / "00ff").read_bytes() == b"chunk"
    assert (root / "locks" / "servers").read_text() == "gc lock of the server"
    assert not (root / "trash").exists() and not (root / "elsewhere").exists()
    assert sorted(p.name for p in (root / "locks").iterdir()) == ["servers"]


def test_append_only_backend_announces_itself(sshd, tmp_path: Path, monkeypatch):
    env = sshd.append_only_client(tmp_path / "offsite")
    monkeypatch.setenv("SUREPOINT_SSH_COMMAND", env["SUREPOINT_SSH_COMMAND"])
    backend = SshBackend(sshd.url("/anything/else"), create=True)
    try:
        assert backend.append_only
        backend.put("restorepoints/x", b"1")
        with pytest.raises(RefusedByServer, match="append-only"):
            backend.delete("restorepoints/x")
        # A deferred put is refused all the same; the refusal comes out of sync().
        backend.put("indexes/x.0", b"first", durable=False)
        backend.sync()
        backend.put("indexes/x.0", b"second", durable=False)
        with pytest.raises(RefusedByServer, match="overwritten"):
            backend.sync()
        assert backend.get("indexes/x.0") == b"first"
        backend.sync()  # the failure was reported once
    finally:
        backend.close()
