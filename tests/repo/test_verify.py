"""verify in process: damage in a chunk shared by several restore points is mapped onto each of them,
samples count per point, skipped chunks are not read, and the plan holds one entry per distinct
chunk however many points share it."""

from __future__ import annotations

import random

from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.chunks import chunk_object_name
from surepoint.repo.repository import Repository
from surepoint.repo.verify import _plan, verify
from surepoint.storage.memory import MemoryBackend
from tests.repo.conftest import CHUNK, MemoryDisk, disk_bytes


def three_points():
    """Three points of one disk: the 2nd changes chunk 1, the 3rd chunk 2; chunk 0 is zeros."""
    backend = MemoryBackend()
    repository = Repository.create(backend, chunk_size=CHUNK)
    data = disk_bytes(8 * CHUNK, seed=7, zero_every=100)
    data[0:CHUNK] = bytes(CHUNK)
    points = [run_backup(repository, BackupRequest("vm", [MemoryDisk(data)]))]
    for changed in (1, 2):
        data[changed * CHUNK : changed * CHUNK + 10] = random.Random(changed).randbytes(10)
        points.append(run_backup(repository, BackupRequest("vm", [MemoryDisk(data)])))
    return backend, repository, points


def test_damage_in_a_shared_chunk_is_mapped_onto_every_point_that_uses_it():
    backend, repository, points = three_points()
    shared = repository.load_index(points[0], 0).ids[5]  # unchanged in all three points
    only_first = repository.load_index(points[0], 0).ids[1]
    for chunk_id in (shared, only_first):
        name = chunk_object_name(chunk_id)
        blob = bytearray(backend.get(name))
        blob[-1] ^= 1
        backend.put(name, bytes(blob))
    report = verify(repository, points)
    assert report.damaged_chunks == 2
    by_point = {p.id: p for p in report.points}
    first = by_point[points[0].id]
    assert first.state == "damaged"
    assert [(r.disk, r.offset, r.length) for r in first.damaged] == [(0, CHUNK, CHUNK), (0, 5 * CHUNK, CHUNK)]
    for later in points[1:]:
        result = by_point[later.id]
        assert result.state == "damaged"
        assert [(r.offset, r.length) for r in result.damaged] == [(5 * CHUNK, CHUNK)]
        assert "authentication" in result.damaged[0].reason or "checksum" in result.damaged[0].reason


def test_a_clean_repository_verifies_every_point_and_counts_distinct_chunks():
    _backend, repository, points = three_points()
    report = verify(repository, points)
    assert not report.damaged
    assert [p.state for p in report.points] == ["verified"] * 3
    assert [p.checked_chunks for p in report.points] == [7, 7, 7]  # 8 chunks, one of them zeros
    assert report.checked_chunks == 9  # 7 shared or first, plus one new chunk in each later point


def test_a_sample_counts_per_point_and_skipped_chunks_are_not_read():
    backend, repository, points = three_points()
    everything = verify(repository, points)
    skip = set(everything.good_chunks[:4])
    reads = []
    original = backend.get
    backend.get = lambda name: (reads.append(name), original(name))[1]
    report = verify(repository, points, skip=skip)
    assert report.skipped_chunks == 4 and report.checked_chunks == 5
    assert not {chunk_object_name(c) for c in skip} & set(reads)
    sampled = verify(repository, points, sample=0.5)
    assert sampled.checked_chunks == round(9 * 0.5)
    assert [p.state for p in sampled.points] == ["unchanged"] * 3
    # each point's count is the number of sampled chunks it uses
    uses = [set(repository.load_index(p, 0).ids) for p in points]
    sampled_ids = set(sampled.good_chunks)
    assert [p.checked_chunks for p in sampled.points] == [len(u & sampled_ids) for u in uses]


def test_the_plan_has_one_entry_per_distinct_chunk():
    _backend, repository, points = three_points()
    plan = _plan(repository, points * 20, skip=())  # sixty points sharing the same chunks
    assert len(plan.owners) == 9
    assert plan.distinct == [7] * 60
    assert plan.owners[repository.load_index(points[0], 0).ids[5]] == (1 << 60) - 1
