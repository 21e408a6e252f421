"""The parallel pipeline: compression skipped only for chunks that do not compress, and a restore
with many chunks in flight that writes every byte in place and keeps holes."""

from __future__ import annotations

import os
import random

import pytest

from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import chunk_object_name
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.storage.memory import MemoryBackend
from tests.repo.conftest import MemoryDisk

MiB = 1 << 20


def text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"etaoinshrdlu") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(10)) + b"\n"
    return bytes(out[:n])


def test_only_chunks_that_compress_are_compressed():
    backend = MemoryBackend()
    repository = Repository.create(backend, chunk_size=MiB)
    rng = random.Random(1)
    chunks = {
        "random": rng.randbytes(MiB),
        "text": text(MiB, 2),
        "random then zeros": rng.randbytes(MiB // 2) + bytes(MiB // 2),
        "text in random": rng.randbytes(MiB // 4) + text(MiB // 2, 3) + rng.randbytes(MiB // 4),
    }
    disk = MemoryDisk(b"".join(chunks.values()))
    point = run_backup(repository, BackupRequest("pipeline", [disk]))
    index = repository.load_index(point, 0)
    compressed = {}
    for name, chunk_id in zip(chunks, index.ids, strict=True):
        blob = backend.get(chunk_object_name(chunk_id))
        compressed[name] = blob[5] == 1  # the envelope's compression byte
    assert compressed == {"random": False, "text": True, "random then zeros": True, "text in random": True}
    assert point.disks[0].stored_bytes < point.disks[0].new_bytes


@pytest.mark.parametrize("workers", [1, 3, 16])
def test_restore_with_chunks_in_flight_is_exact_and_sparse(tmp_path, workers):
    repository = Repository.create(MemoryBackend(), chunk_size=256 << 10)
    rng = random.Random(workers)
    data = bytearray(64 * MiB)
    for _ in range(20):
        at = rng.randrange(0, len(data) - MiB)
        data[at : at + 300_000] = rng.randbytes(300_000)
    point = run_backup(repository, BackupRequest("sparse", [MemoryDisk(data)]))
    target = tmp_path / "restored.img"
    result = restore_disk(repository, point, 0, str(target), workers=workers)
    assert target.read_bytes() == data
    assert result.written_bytes < 20 * MiB
    assert os.stat(target).st_blocks * 512 < 12 * MiB  # zero chunks and zero runs stay holes


def _runs_by_definition(data: bytes, block: int) -> list[tuple[int, int]]:
    """The runs of not-all-zero blocks, the slow obvious way."""
    runs: list[tuple[int, int]] = []
    for pos in range(0, len(data), block):
        piece = data[pos : pos + block]
        if any(piece):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], pos + len(piece))
            else:
                runs.append((pos, pos + len(piece)))
    return runs


@pytest.mark.parametrize("seed", range(8))
def test_nonzero_runs_find_every_byte_of_data(seed):
    from surepoint.repo.restore import SPARSE_BLOCK, _nonzero_runs

    rng = random.Random(seed)
    size = rng.choice([SPARSE_BLOCK * 16, SPARSE_BLOCK * 5 + 1234, 777, SPARSE_BLOCK])
    data = bytearray(size)
    for _ in range(rng.randint(0, 6)):
        at = rng.randrange(size)
        # single bytes in the middle of a block whose first and last bytes are zero, and longer runs
        length = min(size - at, rng.choice([1, 3, 1 + rng.randrange(2 * SPARSE_BLOCK)]))
        data[at : at + length] = b"\x01" * length
    data = bytes(data)
    assert len(data) == size
    runs = _nonzero_runs(data)
    assert runs == _runs_by_definition(data, SPARSE_BLOCK)
    rebuilt = bytearray(size)
    for a, b in runs:
        rebuilt[a:b] = data[a:b]
    assert bytes(rebuilt) == data


def test_restore_over_an_existing_file_writes_zeros_too(tmp_path):
    """--overwrite of a file that held other data: every zero of the disk is written, not left as old bytes."""
    repository = Repository.create(MemoryBackend(), chunk_size=256 << 10)
    data = bytearray(8 * MiB)
    data[MiB : MiB + 5000] = random.Random(4).randbytes(5000)
    point = run_backup(repository, BackupRequest("over", [MemoryDisk(data)]))
    target = tmp_path / "restored.img"
    target.write_bytes(b"\xff" * (9 * MiB))
    restore_disk(repository, point, 0, str(target), overwrite=True)
    assert target.read_bytes() == data


def test_the_allocator_keeps_chunk_buffers():
    """On glibc (this product's platform) the malloc thresholds are taken."""
    from surepoint.memory import keep_chunk_buffers

    assert keep_chunk_buffers() is True
