"""Temporaries a killed ssh server left behind are reported to the client and collected by its gc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surepoint.repo.gc import collect_garbage
from surepoint.repo.repository import Repository
from surepoint.storage.ssh import SshBackend

pytestmark = pytest.mark.timeout(120)


def test_leftovers_of_a_killed_server_are_listed_and_collected(sshd, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SUREPOINT_SSH_COMMAND", sshd.env()["SUREPOINT_SSH_COMMAND"])
    monkeypatch.setenv("SUREPOINT_REMOTE_PATH", sshd.env()["SUREPOINT_REMOTE_PATH"])
    backend = SshBackend(sshd.url(tmp_path / "repo"), create=True)
    try:
        repository = Repository.create(backend)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        leftover = tmp_path / "repo" / "chunks" / "ab" / f"{'ab' * 32}.{int(dead.stdout)}.77.tmp"
        leftover.write_bytes(b"half a chunk")  # what kill -9 of the server in the middle of a put leaves
        (found,) = list(backend.list_temporary())
        assert found.name == str(leftover.relative_to(tmp_path / "repo")) and found.writer_gone
        assert [i.name for i in backend.list("chunks/")] == []
        assert collect_garbage(repository).removed_temporary == 0  # within the grace period
        old = os.stat(leftover).st_mtime - 600
        os.utime(leftover, (old, old))
        assert collect_garbage(repository).removed_temporary == 1
        assert not leftover.exists() and list(backend.list_temporary()) == []
    finally:
        backend.close()
