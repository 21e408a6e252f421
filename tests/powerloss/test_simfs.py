"""The power-loss simulator keeps exactly what was made durable (so the matrix can trust it)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.powerloss.simfs import Recording, materialize

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path, data: bytes, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def test_only_what_was_fsynced_survives(tmp_path):
    seed = tmp_path / "seed"
    (seed / "d").mkdir(parents=True)
    (seed / "d" / "old").write_bytes(b"old contents")
    (seed / "gone").write_bytes(b"to be unlinked")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Recording(str(seed), str(mnt)) as rec:
        _write(mnt / "d" / "unsynced", b"never fsynced", fsync=False)
        _write(mnt / "d" / "data-only", b"file fsynced, directory not", fsync=True)
        rec.mark("files written")
        _write(mnt / "d" / "tmp", b"new contents", fsync=True)
        os.rename(mnt / "d" / "tmp", mnt / "d" / "old")  # atomic replace, not yet durable
        os.unlink(mnt / "gone")
        assert (mnt / "d" / "old").read_bytes() == b"new contents"  # programs see it at once
        rec.mark("renamed")
        _fsync_dir(mnt / "d")
        rec.mark("directory synced")
        _write(mnt / "d" / "empty-later", b"entry durable, data not", fsync=False)
        _fsync_dir(mnt / "d")
    fs = rec.fs
    marks = {m.label: m.persist_points for m in fs.marks}

    def crash(points: int) -> dict[str, bytes]:
        where = tmp_path / f"after-{points}"
        materialize(fs.snapshots[points - 1], str(where))
        return {str(p.relative_to(where)): p.read_bytes() for p in where.rglob("*") if p.is_file()}

    # before the directory fsync: nothing new has a name, the rename and unlink are undone
    assert crash(marks["renamed"]) == {"d/old": b"old contents", "gone": b"to be unlinked"}
    # after it: the fsynced file and the rename are there; the unsynced file has a name but no data
    after = crash(marks["directory synced"])
    assert after["d/old"] == b"new contents" and after["d/data-only"] == b"file fsynced, directory not"
    assert after["d/unsynced"] == b""
    assert "gone" in after  # its directory (the root) was never fsynced
    assert crash(len(fs.snapshots))["d/empty-later"] == b""
