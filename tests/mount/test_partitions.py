"""Partition-table parsing (no root needed): MBR with logical partitions, GPT with CRC checks, hostile tables."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from surepoint.mount.partitions import read_partition_table
from tests.mount.conftest import LINUX_FS, MS_BASIC, MiB, write_ebr, write_gpt, write_mbr


def _table(image: Path):
    data = image.read_bytes()
    return read_partition_table(lambda off, n: data[off : off + n], len(data))


def test_gpt_two_partitions(tmp_path):
    image = tmp_path / "gpt.img"
    write_gpt(image, 16 * MiB, [(LINUX_FS, 2048, 4095, "root"), (MS_BASIC, 4096, 8191, "data")])
    table = _table(image)
    assert table.scheme == "gpt" and not table.warnings
    assert [(p.number, p.start, p.size, p.name) for p in table.partitions] == [
        (1, 1 * MiB, 1 * MiB, "root"),
        (2, 2 * MiB, 2 * MiB, "data"),
    ]
    assert table.partitions[0].type == str(LINUX_FS)


def test_gpt_damaged_primary_header_falls_back_to_backup(tmp_path):
    image = tmp_path / "gpt.img"
    write_gpt(image, 16 * MiB, [(LINUX_FS, 2048, 4095, "root")])
    with open(image, "r+b") as f:
        f.seek(512 + 40)  # first usable LBA: covered by the header CRC
        f.write(b"\x07")
    table = _table(image)
    assert table.scheme == "gpt"
    assert [p.number for p in table.partitions] == [1]
    assert any("CRC32" in w for w in table.warnings) and any("backup" in w for w in table.warnings)


def test_gpt_damaged_everywhere_gives_no_partitions(tmp_path):
    image = tmp_path / "gpt.img"
    size = 16 * MiB
    write_gpt(image, size, [(LINUX_FS, 2048, 4095, "root")])
    with open(image, "r+b") as f:
        for offset in (512 + 40, size - 512 + 40):
            f.seek(offset)
            f.write(b"\x07")
    table = _table(image)
    assert table.scheme == "gpt" and table.partitions == []
    assert table.warnings


def test_gpt_damaged_entry_array_is_detected(tmp_path):
    image = tmp_path / "gpt.img"
    write_gpt(image, 16 * MiB, [(LINUX_FS, 2048, 4095, "root")])
    with open(image, "r+b") as f:
        f.seek(1024 + 41)  # primary entry 0, last LBA
        f.write(b"\xff")
    table = _table(image)
    assert [p.size for p in table.partitions] == [1 * MiB]  # from the intact backup array
    assert any("entry array CRC32" in w for w in table.warnings)


def test_mbr_primary_extended_and_logical_chain(tmp_path):
    image = tmp_path / "mbr.img"
    write_mbr(image, [(0x83, 2048, 2048), (0x05, 8192, 16384)], 16 * MiB)
    write_ebr(image, 8192, (0x83, 2048, 2048), 6144, 4096)  # logical 5, link to the next EBR
    write_ebr(image, 8192 + 6144, (0x0C, 2048, 2048), None, 0)  # logical 6
    table = _table(image)
    assert table.scheme == "mbr" and not table.warnings
    assert [(p.number, p.start // 512, p.size // 512, p.type) for p in table.partitions] == [
        (1, 2048, 2048, "0x83"),
        (5, 10240, 2048, "0x83"),
        (6, 16384, 2048, "0x0c"),
    ]


def test_mbr_looping_logical_chain_stops(tmp_path):
    image = tmp_path / "mbr.img"
    write_mbr(image, [(0x05, 2048, 16384)], 16 * MiB)
    write_ebr(image, 2048, (0x83, 2048, 1024), 4096, 4096)
    write_ebr(image, 2048 + 4096, (0x83, 2048, 1024), 4096, 4096)  # links to itself
    table = _table(image)
    assert [p.number for p in table.partitions] == [5, 6]
    assert any("loops" in w for w in table.warnings)


def test_mbr_partition_outside_disk_and_overlaps_are_ignored(tmp_path):
    image = tmp_path / "mbr.img"
    write_mbr(image, [(0x83, 2048, 4096), (0x83, 4096, 4096), (0x83, 30000, 1 << 30)], 16 * MiB)
    table = _table(image)
    assert [p.number for p in table.partitions] == [1]
    assert len(table.warnings) == 2


def test_fat_boot_sector_and_blank_disk_are_not_partition_tables(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4 * MiB))
    assert _table(blank).scheme is None
    fat = bytearray(4 * MiB)
    fat[0:3] = b"\xeb\x3c\x90"
    fat[3:11] = b"mkfs.fat"
    struct.pack_into("<H", fat, 11, 512)
    fat[54:59] = b"FAT16"
    fat[446 + 4] = 0x06  # boot code bytes that look like a partition entry
    fat[510:512] = b"\x55\xaa"
    image = tmp_path / "fat.img"
    image.write_bytes(bytes(fat))
    assert _table(image).scheme is None


def test_random_garbage_never_raises(tmp_path):
    for seed in range(50):
        data = bytearray(os.urandom(64 << 10))
        if seed % 2:
            data[510:512] = b"\x55\xaa"
        if seed % 3 == 0:
            data[512:520] = b"EFI PART"
        blob = bytes(data)
        table = read_partition_table(lambda off, n, blob=blob: blob[off : off + n], len(blob))
        for p in table.partitions:
            assert p.start > 0 and p.start + p.size <= len(blob)
