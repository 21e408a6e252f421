"""XFS free-space btrees against xfs_db, the log checks, and damage that must mean "read in full"."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from surepoint.fsmap import xfs
from surepoint.fsmap.volume import Inconsistent
from tests.fsmap.conftest import MiB, make_xfs, needs, patch, reader, sh, staging, xfs_free

pytestmark = needs("mkfs.xfs", "xfs_db")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return staging(tmp_path_factory.mktemp("files"), files=60)


@pytest.mark.parametrize(
    "options",
    [(), ("-m", "crc=0", "-i", "sparse=0"), ("-b", "size=1024"), ("-d", "agcount=7"), ("-m", "rmapbt=1")],
    ids=["v5 default", "v4 (no CRCs)", "1K blocks", "7 AGs", "rmapbt"],
)
def test_free_extents_match_xfs_db(tmp_path, files, options):
    image = make_xfs(tmp_path / "fs.img", (700 if "agcount=7" in options else 400) * MiB, *options, files=files)
    read, size = reader(image)
    free = xfs.free_extents(read, size)
    assert free == xfs_free(image)
    assert 200 * MiB < sum(e.length for e in free)


def _agf(image, agno=0):
    read, _ = reader(image)
    sb = read(0, 512)
    blocksize, agblocks, sectsize = struct.unpack_from(">I", sb, 4)[0], struct.unpack_from(">I", sb, 84)[0], 512
    return agno * agblocks * blocksize + sectsize


def test_a_damaged_agf_means_read_in_full(tmp_path):
    image = make_xfs(tmp_path / "fs.img", 320 * MiB)
    patch(image, _agf(image, 1) + 52, struct.pack(">I", 12345))  # agf_freeblks
    read, size = reader(image)
    with pytest.raises(Inconsistent, match="AGF CRC"):
        xfs.free_extents(read, size)


def test_free_counts_that_disagree_mean_read_in_full(tmp_path):
    image = make_xfs(tmp_path / "fs.img", 320 * MiB, "-m", "crc=0", "-i", "sparse=0")
    patch(image, _agf(image, 2) + 52, struct.pack(">I", 12345))
    read, size = reader(image)
    with pytest.raises(Inconsistent, match="the AGF says 12345"):
        xfs.free_extents(read, size)


def test_a_damaged_btree_block_means_read_in_full(tmp_path):
    image = make_xfs(tmp_path / "fs.img", 320 * MiB)
    read, size = reader(image)
    agf = read(_agf(image), 512)
    root = struct.unpack_from(">I", agf, 16)[0]
    blocksize = struct.unpack_from(">I", read(0, 8), 4)[0]
    patch(image, root * blocksize + 60, struct.pack(">II", 100, 50))  # a record
    with pytest.raises(Inconsistent, match="CRC"):
        xfs.free_extents(read, size)


def test_a_filesystem_larger_than_its_volume_is_inconsistent(tmp_path):
    image = make_xfs(tmp_path / "fs.img", 320 * MiB)
    read, size = reader(image)
    with pytest.raises(Inconsistent, match="larger than its volume"):
        xfs.free_extents(read, size - MiB)


# --- a mounted filesystem: frozen (its log is covered) or not (its log holds changes) ----------


@pytest.fixture
def mounted_xfs(tmp_path, request):
    image = make_xfs(tmp_path / "fs.img", 400 * MiB, *getattr(request, "param", ()))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "loop", image, mnt)
    try:
        yield image, mnt
    finally:
        subprocess.run(["xfs_freeze", "-u", str(mnt)], capture_output=True)
        sh("umount", mnt)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices")
@needs("xfs_freeze", "mount")
def test_a_frozen_filesystem_is_mapped_and_an_unfrozen_one_is_not(mounted_xfs, files, tmp_path):
    image, mnt = mounted_xfs
    shutil.copytree(files, mnt / "a")
    shutil.copytree(files, mnt / "b")
    sh("sync")
    shutil.rmtree(mnt / "a")
    sh("xfs_freeze", "-f", mnt)
    frozen = tmp_path / "frozen.img"
    sh("cp", "--sparse=always", image, frozen)
    sh("xfs_freeze", "-u", mnt)
    read, size = reader(frozen)
    assert xfs.free_extents(read, size) == xfs_free(frozen)

    shutil.copytree(files, mnt / "c")
    sh("sync")  # the log is on disk, the btrees are not written back yet
    dirty = tmp_path / "dirty.img"
    sh("cp", "--sparse=always", image, dirty)
    read, size = reader(dirty)
    with pytest.raises(Inconsistent, match="log holds"):
        xfs.free_extents(read, size)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices")
@needs("mount")
@pytest.mark.parametrize("mounted_xfs", [("-b", "size=1024", "-d", "agcount=2")], indirect=True)
def test_a_fragmented_filesystem_with_a_deep_btree(mounted_xfs, tmp_path):
    image, mnt = mounted_xfs
    for i in range(3000):
        (mnt / f"{i}").write_bytes(b"x" * 3000)
    sh("sync")
    for i in range(0, 3000, 2):
        (mnt / f"{i}").unlink()
    sh("umount", mnt)
    try:
        read, size = reader(image)
        agf = read(_agf(image), 512)
        assert struct.unpack_from(">I", agf, 28)[0] >= 2  # the by-block btree has a node level
        free = xfs.free_extents(read, size)
        assert free == xfs_free(image)
        assert len(free) > 1000
    finally:
        sh("mount", "-o", "loop", image, mnt)
