"""In-process job tests: a repository on the memory backend and a real (SQLite) catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.catalog import Catalog
from surepoint.events import EventRecorder
from surepoint.repo.repository import Repository
from surepoint.storage.memory import MemoryBackend


@pytest.fixture
def repo() -> Repository:
    backend = MemoryBackend()
    Repository.create(backend, encryption="none", passphrase=None, chunk_size=64 << 10, compression_level=1)
    return Repository.open(backend, lambda: "")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    c = Catalog(str(tmp_path / "catalog.sqlite"))
    yield c
    c.close()


@pytest.fixture
def events(repo: Repository, catalog: Catalog) -> EventRecorder:
    return EventRecorder(catalog, repo.id)
