"""Fast in-process fixtures for the repository engine: a memory backend, small chunks, disks in memory."""

from __future__ import annotations

import random

import pytest

from surepoint.repo.extents import Extent
from surepoint.repo.repository import Repository
from surepoint.storage.memory import MemoryBackend

CHUNK = 64 << 10  # the smallest chunk size: many chunks from small disks


class MemoryDisk:
    """A disk source over a bytearray (the DiskSource protocol), with optional changed-block tracking."""

    def __init__(self, data: bytes | bytearray, name: str = "disk0", *, changed: list[Extent] | None = None) -> None:
        self.data = bytearray(data)
        self.name = name
        self.size = len(data)
        self._changed = changed
        self.reads: list[tuple[int, int]] = []

    def allocated(self) -> list[Extent]:
        return [Extent(0, self.size)] if self.size else []

    def changed(self) -> list[Extent] | None:
        return self._changed

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return bytes(self.data[offset : offset + length])

    def close(self) -> None:
        pass

    @property
    def read_bytes(self) -> int:
        return sum(length for _offset, length in self.reads)


def disk_bytes(size: int, seed: int, zero_every: int = 4) -> bytearray:
    """Random data with an all-zero chunk every `zero_every` chunks and a short last chunk if size says so."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start in range(0, size, CHUNK * zero_every):
        data[start : start + CHUNK] = bytes(min(CHUNK, size - start))
    return data


@pytest.fixture
def backend(request) -> MemoryBackend:
    """A memory backend; tests marked `s3` run a second time on an S3 bucket (SeaweedFS)."""
    if getattr(request, "param", "memory") == "s3":
        from tests.servers.seaweedfs import s3_backend_for_test

        return s3_backend_for_test(request)
    return MemoryBackend()


@pytest.fixture
def repository(backend: MemoryBackend) -> Repository:
    return Repository.create(backend, chunk_size=CHUNK)


@pytest.fixture(scope="session")
def encrypted_template() -> dict[str, bytes]:
    """The objects of a new encrypted repository, made once (key derivation takes a moment)."""
    backend = MemoryBackend()
    Repository.create(backend, encryption="aes-256-gcm", passphrase="correct horse", chunk_size=CHUNK)
    return {info.name: backend.get(info.name) for info in backend.list("")}


@pytest.fixture
def encrypted(encrypted_template: dict[str, bytes]) -> Repository:
    backend = MemoryBackend()
    for name, data in encrypted_template.items():
        backend.put(name, data)
    return Repository.open(backend, lambda: "correct horse")
