"""CRC32C (Castagnoli) and CRC16 (ANSI), the checksums ext4 and XFS store next to their metadata.

Table-driven in Python: the reader checksums a few kilobytes per allocation group, which this
handles in milliseconds; the standard library has only zlib's CRC32 (a different polynomial).
"""

from __future__ import annotations


def _table(poly: int) -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _table(0x82F63B78)
_CRC16 = _table(0xA001)


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The running CRC32C register without the final inversion (what ext4 stores)."""
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes) -> int:
    """The standard CRC32C of `data` (initial value and final XOR 0xFFFFFFFF; what XFS stores)."""
    return crc32c_raw(data) ^ 0xFFFFFFFF


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC16/ANSI, reflected, as ext4's uninit_bg group descriptor checksum uses it."""
    table = _CRC16
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc
