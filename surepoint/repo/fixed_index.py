"""The fixed index: one chunk id per fixed-size, disk-aligned chunk of one disk of one restore point."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from surepoint.errors import DamagedData
from surepoint.repo.chunks import DIGEST_SIZE, ZERO_ID

MAGIC = b"SPFX"
VERSION = 1
HEADER = struct.Struct("<4sHHQIHHQ")  # magic, version, reserved, disk size, chunk size, digest size, reserved, count


@dataclass
class FixedIndex:
    """Chunk ids in disk order. Entry i covers bytes [i*chunk_size, min((i+1)*chunk_size, disk_size))."""

    disk_size: int
    chunk_size: int
    ids: list[bytes] = field(default_factory=list)

    @classmethod
    def empty(cls, disk_size: int, chunk_size: int) -> FixedIndex:
        return cls(disk_size, chunk_size, [ZERO_ID] * chunk_count(disk_size, chunk_size))

    def chunk_range(self, number: int) -> tuple[int, int]:
        """(offset, length) of chunk `number` on the disk."""
        offset = number * self.chunk_size
        return offset, min(self.chunk_size, self.disk_size - offset)

    def encode(self) -> bytes:
        # Written into one zeroed buffer (ZERO_ID entries are already in place): bytes.join would hold a
        # buffer descriptor per entry, 80 MiB for the million entries of a 1 TiB disk.
        out = bytearray(HEADER.size + len(self.ids) * DIGEST_SIZE)
        HEADER.pack_into(out, 0, MAGIC, VERSION, 0, self.disk_size, self.chunk_size, DIGEST_SIZE, 0, len(self.ids))
        zero = ZERO_ID
        pos = HEADER.size
        for chunk_id in self.ids:
            if chunk_id is not zero and chunk_id != zero:
                out[pos : pos + DIGEST_SIZE] = chunk_id
            pos += DIGEST_SIZE
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, what: str = "index") -> FixedIndex:
        if len(data) < HEADER.size:
            raise DamagedData(f"{what} is damaged (truncated header)")
        magic, version, _, disk_size, chunk_size, digest_size, _, count = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or digest_size != DIGEST_SIZE or chunk_size <= 0:
            raise DamagedData(f"{what} is damaged (bad header)")
        if count != chunk_count(disk_size, chunk_size) or len(data) != HEADER.size + count * DIGEST_SIZE:
            raise DamagedData(f"{what} is damaged (entry count does not match its size)")
        # Entries of never-written space are all ZERO_ID: they share that one object, so a thin 1 TiB disk
        # (a million entries) costs a list of pointers rather than a million bytes objects.
        zero = ZERO_ID
        end = HEADER.size + count * DIGEST_SIZE
        ids = [
            zero if (entry := data[i : i + DIGEST_SIZE]) == zero else entry
            for i in range(HEADER.size, end, DIGEST_SIZE)
        ]
        return cls(disk_size, chunk_size, ids)


def chunk_count(disk_size: int, chunk_size: int) -> int:
    return (disk_size + chunk_size - 1) // chunk_size
