"""The ssh:// backend keeps the storage contract: the conformance suite through a real sshd and `surepoint serve`."""

from __future__ import annotations

import os

import pytest

from surepoint import storage
from tests.storage.suite import BackendSuite


class TestSshBackend(BackendSuite):
    @pytest.fixture
    def backend(self, sshd, tmp_path, monkeypatch):
        for key, value in sshd.env().items():
            monkeypatch.setenv(key, value)
        b = storage.open(sshd.url(tmp_path / "repo"), create=True)
        yield b
        b.close()

    def age(self, backend, name, seconds):
        path = os.path.join(backend.server_root, name)  # the server is this host
        st = os.stat(path)
        os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))
        return True
