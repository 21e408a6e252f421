"""Whole disks: partition tables (GPT, MBR with logical partitions) around ext4, XFS and swap."""

from __future__ import annotations

import pytest

from surepoint.fsmap import Status, map_disk, swap
from surepoint.repo.extents import Extent
from tests.fsmap.conftest import (
    MiB,
    blank,
    copy_into,
    ext4_free,
    make_ext4,
    make_xfs,
    needs,
    partition,
    patch,
    reader,
    sh,
    staging,
    xfs_free,
)

pytestmark = needs("mke2fs", "debugfs", "dumpe2fs", "mkfs.xfs", "xfs_db", "mkswap", "sfdisk")


def shifted(extents: list[Extent], by: int) -> list[Extent]:
    return [Extent(e.offset + by, e.length) for e in extents]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """An ext4, an XFS and a swap image, each with its expected free ranges."""
    tmp = tmp_path_factory.mktemp("parts")
    files = staging(tmp / "files")
    ext = make_ext4(tmp / "ext4.img", 200 * MiB, "-t", "ext4", files=files, remove=("f001", "f004"))
    xf = make_xfs(tmp / "xfs.img", 320 * MiB, files=files)
    sw = blank(tmp / "swap.img", 64 * MiB)
    sh("mkswap", "-q", sw)
    return {"ext4": (ext, ext4_free(ext)), "xfs": (xf, xfs_free(xf)), "swap": (sw, None)}


@pytest.mark.parametrize("scheme", ["gpt", "dos"])
def test_every_partition_is_found_and_mapped(tmp_path, parts, scheme):
    disk = blank(tmp_path / "disk.img", 700 * MiB)
    if scheme == "gpt":
        script = "label: gpt\n,1M,21686148-6449-6E6F-744E-656564454649\n,200M\n,320M\n,64M,S\n,\n"
    else:  # the swap and a last, empty partition are logical partitions inside an extended one
        script = "label: dos\n,200M\n,320M\n,,E\n,64M,S\n,\n"
    layout = partition(disk, script)
    if scheme == "gpt":
        _bios, ext, xf, sw, empty = layout
    else:
        ext, xf, _extended, sw, empty = layout
    copy_into(disk, ext[0], parts["ext4"][0])
    copy_into(disk, xf[0], parts["xfs"][0])
    copy_into(disk, sw[0], parts["swap"][0])

    read, size = reader(disk)
    result = map_disk(read, size)
    kinds = {v.kind: v for v in result.volumes}
    assert kinds["ext4"].status is Status.MAPPED
    assert kinds["ext4"].free == shifted(parts["ext4"][1], ext[0])
    assert kinds["xfs"].status is Status.MAPPED
    assert kinds["xfs"].free == shifted(parts["xfs"][1], xf[0])
    assert kinds["swap"].status is Status.SKIPPED
    assert kinds["swap"].free == [Extent(sw[0] + 4096, sw[1] - 4096)]
    assert kinds["unknown"].status is Status.READ and kinds["unknown"].start == empty[0]
    assert not any(v.free for v in result.volumes if v.status is Status.READ)
    # Nothing outside a mapped volume is ever called free (partition tables, gaps, the BIOS boot partition).
    mapped = (kinds["ext4"], kinds["xfs"], kinds["swap"])
    for e in result.free:
        assert any(v.start <= e.offset and e.end <= v.start + v.size for v in mapped)


def test_a_whole_disk_filesystem(parts):
    image, expected = parts["xfs"]
    read, size = reader(image)
    result = map_disk(read, size)
    assert [(v.where, v.kind, v.status) for v in result.volumes] == [("whole disk", "xfs", Status.MAPPED)]
    assert result.free == expected


def test_a_damaged_filesystem_is_read_in_full_and_says_why(tmp_path, parts):
    image = tmp_path / "ext4.img"
    sh("cp", "--sparse=always", parts["ext4"][0], image)
    patch(image, 1024 + 0x78, b"tampered")
    read, size = reader(image)
    (volume,) = map_disk(read, size).volumes
    assert volume.status is Status.READ and volume.free == []
    assert "superblock checksum does not match" in volume.describe()


def test_a_hibernation_image_in_swap_is_kept(tmp_path, parts):
    image = tmp_path / "swap.img"
    sh("cp", "--sparse=always", parts["swap"][0], image)
    patch(image, 4096 - 10, b"S1SUSPEND\0")
    read, size = reader(image)
    assert swap.page_size(read, size) is None
    (volume,) = map_disk(read, size).volumes
    assert volume.status is Status.READ and volume.free == []


def test_an_empty_or_tiny_disk(tmp_path):
    for size in (0, 1000, 4 * MiB):
        image = blank(tmp_path / f"{size}.img", size)
        read, length = reader(image)
        result = map_disk(read, length)
        assert result.free == []
