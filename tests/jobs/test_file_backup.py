"""jobs.file_backup in process: what it stores restores bit-exactly, progress adds up, events tell the story."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.errors import SourceError
from surepoint.jobs.file_backup import backup_files
from surepoint.repo.restore import restore_disk
from tests.conftest import change_image, make_image, sha256_file


def test_backup_then_incremental_restores_each_point_exactly(repo, catalog, events, tmp_path: Path):
    image = make_image(tmp_path / "disk.img", 3 << 20, seed=5, region_size=128 << 10)
    totals: list[int] = []
    advanced: list[int] = []

    def progress(total: int):
        totals.append(total)
        return advanced.append

    first = backup_files(repo, events, [str(image)], progress=progress)
    first_digest = sha256_file(image)
    change_image(image, seed=6)
    second = backup_files(repo, events, [str(image)])
    assert first.name == second.name == "disk.img"
    assert second.parent == first.id  # incremental against the latest point of that name
    assert totals == [3 << 20] and sum(advanced) == 3 << 20

    for point, digest in ((first, first_digest), (second, sha256_file(image))):
        target = tmp_path / f"{point.id}.img"
        restore_disk(repo, point, 0, str(target))
        assert sha256_file(target) == digest

    # (a "plan" event between says what the free-space maps found)
    phases = [(e.restore_point, e.component, e.phase, e.outcome) for e in catalog.events(repo.id) if e.phase != "plan"]
    assert phases == [
        (first.id, "job", "start", "ok"),
        (first.id, "job", "commit", "ok"),
        (second.id, "job", "start", "ok"),
        (second.id, "job", "commit", "ok"),
    ]
    assert {e.source for e in catalog.events(repo.id)} == {"disk.img"}


def test_full_ignores_the_previous_point(repo, events, tmp_path: Path):
    image = make_image(tmp_path / "disk.img", 1 << 20, seed=1, regions=2, region_size=64 << 10)
    first = backup_files(repo, events, [str(image)], name="web")
    again = backup_files(repo, events, [str(image)], name="web", full=True)
    assert first.parent is None and again.parent is None
    assert again.disks[0].read_bytes == first.disks[0].read_bytes > 0  # every data block read again
    assert again.disks[0].new_chunks == 0  # and deduplicated against what the repository holds


def test_a_missing_source_fails_before_anything_is_recorded(repo, catalog, events, tmp_path: Path):
    with pytest.raises(SourceError):
        backup_files(repo, events, [str(tmp_path / "nothing.img")])
    assert repo.list_restore_points() == []
    assert catalog.events(repo.id) == []
