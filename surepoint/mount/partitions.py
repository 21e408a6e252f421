"""Partition tables read from the bytes of a disk image: MBR (with extended/logical partitions) and GPT.

The disk comes from an untrusted guest, so every number is checked against the disk size, the
logical-partition chain is bounded and loop-checked, and a GPT header is used only when its CRC32
(and the CRC32 of its entry array) match; a damaged primary header falls back to the backup header
at the end of the disk.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sector count
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
MBR_PROTECTIVE_GPT = 0xEE
MAX_LOGICAL = 128
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
MAX_GPT_ENTRIES = 1024

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Partition:
    number: int  # 1-4 primary, 5+ logical (MBR); entry number (GPT)
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # "0x83" (MBR) or the type GUID (GPT)
    name: str = ""  # GPT partition name
    uuid: str = ""  # PARTUUID as Linux shows it: the GPT unique GUID, or MBR disk signature-number

    def describe(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"partition {self.number}{label} (type {self.type}, {self.size} bytes at offset {self.start})"


@dataclass
class PartitionTable:
    scheme: str | None  # "mbr", "gpt" or None (no partition table: maybe a whole-disk filesystem)
    partitions: list[Partition] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_partition_table(read: ReadFn, disk_size: int) -> PartitionTable:
    """The partition table of a disk; `read(offset, length)` returns the disk's bytes."""
    if disk_size < 2 * SECTOR:
        return PartitionTable(None)
    mbr = read(0, SECTOR)
    if mbr[510:512] != MBR_SIGNATURE:
        # A GPT disk always has a protective MBR, but look anyway: some tools leave it out.
        gpt = _read_gpt(read, disk_size, [])
        return gpt if gpt is not None else PartitionTable(None)
    entries = [MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    warnings: list[str] = []
    if any(e[2] == MBR_PROTECTIVE_GPT for e in entries):
        gpt = _read_gpt(read, disk_size, warnings)
        if gpt is not None:
            return gpt
        return PartitionTable("gpt", [], warnings or ["GPT: no valid header found"])
    if _looks_like_boot_sector(mbr) or any(e[0] not in (0x00, 0x80) for e in entries):
        return PartitionTable(None)  # a FAT/NTFS volume boot record, not a partition table
    if not any(e[2] and e[5] for e in entries):
        # An empty table; a GPT without a protective entry is still worth a look.
        gpt = _read_gpt(read, disk_size, [])
        return gpt if gpt is not None else PartitionTable(None)
    table = PartitionTable("mbr", [], warnings)
    signature = f"{struct.unpack_from('<I', mbr, 440)[0]:08x}"
    disk_sectors = disk_size // SECTOR
    for i, (_status, _chs1, ptype, _chs2, lba, count) in enumerate(entries):
        if not ptype or not count:
            continue
        if lba == 0 or lba + count > disk_sectors:
            warnings.append(f"MBR partition {i + 1} lies outside the disk (sectors {lba}+{count}); ignored")
            continue
        if ptype in MBR_EXTENDED_TYPES:
            _read_logical(read, lba, count, disk_sectors, table)
            continue
        table.partitions.append(Partition(i + 1, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
    _drop_overlaps(table)
    table.partitions = [replace(p, uuid=f"{signature}-{p.number:02x}") for p in table.partitions]
    return table


def _looks_like_boot_sector(sector: bytes) -> bool:
    """A FAT, exFAT or NTFS boot sector also ends in 55 AA; such a disk is a whole-disk filesystem."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    if sector[0] not in (0xEB, 0xE9):
        return False
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    return bytes_per_sector in (512, 1024, 2048, 4096) and (
        sector[54:59] == b"FAT12" or sector[54:59] == b"FAT16" or sector[82:87] == b"FAT32" or sector[54:57] == b"FAT"
    )


def _read_logical(read: ReadFn, ext_lba: int, ext_count: int, disk_sectors: int, table: PartitionTable) -> None:
    """Walk the chain of extended boot records inside an extended partition."""
    number = 5
    ebr_lba = ext_lba
    seen: set[int] = set()
    while len(seen) < MAX_LOGICAL:
        if ebr_lba in seen:
            table.warnings.append("MBR: the logical-partition chain loops; stopped")
            return
        seen.add(ebr_lba)
        ebr = read(ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != MBR_SIGNATURE:
            table.warnings.append(f"MBR: extended boot record at sector {ebr_lba} has no signature; chain stopped")
            return
        first = MBR_ENTRY.unpack_from(ebr, 446)
        link = MBR_ENTRY.unpack_from(ebr, 462)
        _status, _c1, ptype, _c2, rel, count = first
        if ptype and count:
            lba = ebr_lba + rel
            if rel == 0 or lba + count > ext_lba + ext_count or lba + count > disk_sectors:
                table.warnings.append(f"MBR logical partition {number} lies outside its extended partition; ignored")
            else:
                table.partitions.append(Partition(number, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
            number += 1
        if link[2] not in MBR_EXTENDED_TYPES or not link[4]:
            return
        ebr_lba = ext_lba + link[4]
        if ebr_lba >= ext_lba + ext_count:
            table.warnings.append("MBR: the logical-partition chain leaves its extended partition; stopped")
            return
    table.warnings.append(f"MBR: more than {MAX_LOGICAL} logical partitions; stopped")


def _read_gpt(read: ReadFn, disk_size: int, warnings: list[str]) -> PartitionTable | None:
    """The GPT, from the primary header or else the backup one; None when neither is valid."""
    last_lba = disk_size // SECTOR - 1
    for lba, what in ((1, "primary"), (last_lba, "backup")):
        problem = None
        header = read(lba * SECTOR, SECTOR)
        if header[:8] != GPT_SIGNATURE:
            if what == "primary":
                warnings.append("GPT: no primary header")
            continue
        try:
            table = _parse_gpt(read, header, lba, last_lba)
        except ValueError as exc:
            problem = str(exc)
        if problem is None:
            if what == "backup":
                warnings.append("GPT: primary header is damaged; using the backup header")
            table.warnings = warnings + table.warnings
            return table
        warnings.append(f"GPT {what} header: {problem}")
    return None


def _parse_gpt(read: ReadFn, header: bytes, my_lba: int, last_lba: int) -> PartitionTable:
    (
        _sig,
        _revision,
        header_size,
        header_crc,
        _reserved,
        current_lba,
        _backup_lba,
        first_usable,
        last_usable,
        _disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = GPT_HEADER.unpack_from(header)
    if not GPT_HEADER.size <= header_size <= SECTOR:
        raise ValueError(f"bad header size {header_size}")
    check = bytearray(header[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != header_crc:
        raise ValueError("header CRC32 does not match")
    if current_lba != my_lba:
        raise ValueError(f"header says it is at sector {current_lba}, found at {my_lba}")
    if entry_size < 128 or entry_size % 8 or entry_size > 4096:
        raise ValueError(f"bad entry size {entry_size}")
    if entry_count > MAX_GPT_ENTRIES:
        raise ValueError(f"too many entries ({entry_count})")
    if not first_usable <= last_usable <= last_lba:
        raise ValueError("usable area lies outside the disk")
    array_bytes = entry_count * entry_size
    if entries_lba < 2 and my_lba == 1 or (entries_lba * SECTOR + array_bytes) > (last_lba + 1) * SECTOR:
        raise ValueError("partition entry array lies outside the disk")
    array = read(entries_lba * SECTOR, array_bytes)
    if zlib.crc32(array) != entries_crc:
        raise ValueError("partition entry array CRC32 does not match")
    table = PartitionTable("gpt")
    for i in range(entry_count):
        entry = array[i * entry_size : (i + 1) * entry_size]
        type_guid = entry[:16]
        if type_guid == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        if first < first_usable or last > last_usable or last < first:
            table.warnings.append(f"GPT partition {i + 1} lies outside the usable area; ignored")
            continue
        table.partitions.append(
            Partition(
                i + 1,
                first * SECTOR,
                (last - first + 1) * SECTOR,
                str(uuid.UUID(bytes_le=bytes(type_guid))),
                name,
                str(uuid.UUID(bytes_le=bytes(entry[16:32]))),
            )
        )
    _drop_overlaps(table)
    return table


def _drop_overlaps(table: PartitionTable) -> None:
    """Keep the first of overlapping partitions (a damaged or hostile table), with a warning."""
    kept: list[Partition] = []
    for p in sorted(table.partitions, key=lambda p: p.start):
        if kept and p.start < kept[-1].start + kept[-1].size:
            table.warnings.append(f"partition {p.number} overlaps partition {kept[-1].number}; ignored")
            continue
        kept.append(p)
    table.partitions = sorted(kept, key=lambda p: p.number)
