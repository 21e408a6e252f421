"""ext2/3/4 block bitmaps against dumpe2fs on images made by mke2fs, and the cases that must fall back."""

from __future__ import annotations

import struct

import pytest

from surepoint.fsmap import ext4
from surepoint.fsmap.volume import Inconsistent, NotUnderstood
from tests.fsmap.conftest import MiB, ext4_free, make_ext4, needs, patch, reader, staging

pytestmark = needs("mke2fs", "debugfs", "dumpe2fs")

LAYOUTS = {
    "ext4 default (64bit, flex_bg, metadata_csum, 4K)": ("-t", "ext4", "-b", "4096"),
    "ext4 1K blocks": ("-t", "ext4", "-b", "1024"),
    "ext4 uninit_bg without metadata_csum": ("-t", "ext4", "-O", "^metadata_csum,uninit_bg"),
    "ext4 32-bit, no flex_bg": ("-t", "ext4", "-O", "^64bit,^flex_bg"),
    "ext4 sparse_super2": ("-t", "ext4", "-O", "sparse_super2"),
    "ext4 small flex groups": ("-t", "ext4", "-G", "2", "-g", "8192"),
    "ext3": (
        "-t",
        "ext3",
    ),
    "ext2": (
        "-t",
        "ext2",
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return staging(tmp_path_factory.mktemp("files"))


@pytest.mark.parametrize("options", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_free_blocks_match_dumpe2fs(tmp_path, files, options):
    image = make_ext4(tmp_path / "fs.img", 400 * MiB, *options, files=files, remove=("f003", "f010", "f017"))
    read, size = reader(image)
    free = ext4.free_extents(read, size)
    assert free == ext4_free(image)
    assert sum(e.length for e in free) > 300 * MiB


def test_bigalloc_never_calls_used_clusters_free(tmp_path, files):
    image = make_ext4(tmp_path / "fs.img", 400 * MiB, "-t", "ext4", "-O", "bigalloc", "-C", "16384", files=files)
    read, size = reader(image)
    free = ext4.free_extents(read, size)
    reference = ext4_free(image)
    # Groups whose bitmap was never written are kept whole with bigalloc: a subset, never more.
    for e in free:
        assert any(r.offset <= e.offset and e.end <= r.end for r in reference), e
    assert 0 < sum(e.length for e in free) < sum(e.length for e in reference)


def test_many_groups_stay_fast(tmp_path):
    image = make_ext4(tmp_path / "big.img", 64 << 30, "-t", "ext4")  # sparse: 512 groups, mostly BLOCK_UNINIT
    read, size = reader(image)
    assert ext4.free_extents(read, size) == ext4_free(image)


def _group_descriptor_offset(image) -> tuple[int, int, int]:
    read, _ = reader(image)
    sb = read(1024, 1024)
    block_size = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
    first_data_block = struct.unpack_from("<I", sb, 0x14)[0]
    return (first_data_block + 1) * block_size, block_size, struct.unpack_from("<H", sb, 0xFE)[0]


def test_a_damaged_bitmap_means_read_in_full(tmp_path, files):
    image = make_ext4(tmp_path / "fs.img", 256 * MiB, "-t", "ext4", "-b", "4096", files=files)
    gdt, block_size, _ = _group_descriptor_offset(image)
    read, size = reader(image)
    bitmap_block = struct.unpack_from("<I", read(gdt, 4))[0]
    patch(image, bitmap_block * block_size + 10, b"\x00\x00")  # blocks in use now look free
    with pytest.raises(Inconsistent, match="checksum|free"):
        ext4.free_extents(read, size)


def test_counts_that_disagree_mean_read_in_full(tmp_path, files):
    image = make_ext4(tmp_path / "fs.img", 256 * MiB, "-t", "ext4", "-O", "^metadata_csum,^uninit_bg", files=files)
    gdt, block_size, _ = _group_descriptor_offset(image)
    read, size = reader(image)
    bitmap_block = struct.unpack_from("<I", read(gdt, 4))[0]
    patch(image, bitmap_block * block_size + 100, b"\x00")  # no checksums here: only the count tells
    with pytest.raises(Inconsistent, match="descriptor says"):
        ext4.free_extents(read, size)


def test_a_journal_that_needs_recovery_means_read_in_full(tmp_path):
    image = make_ext4(tmp_path / "fs.img", 64 * MiB, "-t", "ext4", "-O", "^metadata_csum")
    read, size = reader(image)
    incompat = struct.unpack_from("<I", read(1024 + 0x60, 4))[0]
    patch(image, 1024 + 0x60, struct.pack("<I", incompat | ext4.INCOMPAT_RECOVER))
    with pytest.raises(Inconsistent, match="journal needs recovery"):
        ext4.free_extents(read, size)


def test_a_damaged_superblock_checksum_means_read_in_full(tmp_path):
    image = make_ext4(tmp_path / "fs.img", 64 * MiB, "-t", "ext4")
    patch(image, 1024 + 0x78, b"tampered")  # the volume name
    read, size = reader(image)
    with pytest.raises(Inconsistent, match="superblock checksum"):
        ext4.free_extents(read, size)


def test_unknown_features_are_not_guessed_at(tmp_path):
    image = make_ext4(tmp_path / "fs.img", 64 * MiB, "-t", "ext4", "-O", "^metadata_csum")
    read, size = reader(image)
    incompat = struct.unpack_from("<I", read(1024 + 0x60, 4))[0]
    patch(image, 1024 + 0x60, struct.pack("<I", incompat | 0x40000000))
    with pytest.raises(NotUnderstood, match="unknown ext4 incompatible features"):
        ext4.free_extents(read, size)


def test_a_filesystem_larger_than_its_volume_is_inconsistent(tmp_path):
    image = make_ext4(tmp_path / "fs.img", 64 * MiB, "-t", "ext4")
    read, size = reader(image)
    with pytest.raises(Inconsistent, match="larger than its volume"):
        ext4.free_extents(read, size - MiB)
