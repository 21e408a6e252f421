"""The in-memory backend the fast engine tests use: the conformance suite and its crash model."""

from __future__ import annotations

import pytest

from surepoint.storage.memory import MemoryBackend
from tests.storage.suite import BackendSuite


class TestMemoryBackend(BackendSuite):
    @pytest.fixture
    def backend(self):
        b = MemoryBackend()
        yield b
        b.close()

    def age(self, backend, name, seconds):
        backend.set_mtime(name, backend.stat(name).mtime - seconds)
        return True

    def reopen(self, backend):
        return backend


def test_crash_loses_exactly_the_unsynced_puts():
    backend = MemoryBackend()
    backend.put("config", b"v1")
    backend.put("chunks/00/a", b"synced", durable=False)
    backend.sync()
    backend.put("chunks/00/b", b"lost", durable=False)
    backend.put("config", b"v2", durable=False)
    backend.put("restorepoints/p", b"durable")
    backend.crash()
    assert sorted(i.name for i in backend.list("")) == ["chunks/00/a", "config", "restorepoints/p"]
    assert backend.get("config") == b"v1"


def test_clock_is_injectable():
    now = [1000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    backend.put("x", b"1")
    now[0] = 2000.0
    assert backend.stat("x").mtime == 1000.0
    assert backend.touch("x") and backend.stat("x").mtime == 2000.0
