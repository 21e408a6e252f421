"""The envelope every stored object is wrapped in: header, optional compression, encryption or checksum.

Layout (see docs/repository-format.md):
    magic "SPO1" | kind u8 | compression u8 | cipher u8 | reserved u8 | body
    body, cipher = none: payload || BLAKE3(header || binding || payload)
    body, encrypted:     nonce[12] || AEAD(payload) with associated data header || binding
`binding` is the object's logical name (a chunk id, "restorepoints/<id>"), so an object moved to
another name fails its check.
"""

from __future__ import annotations

import os
import struct
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag

from surepoint.errors import DamagedData
from surepoint.repo.crypto import CIPHER_CODES, NONCE_SIZE, Keys

MAGIC = b"SPO1"
HEADER = struct.Struct("<4sBBBB")

KIND_CHUNK = 1
KIND_INDEX = 2
KIND_MANIFEST = 3
KIND_RECORD = 4

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1


class Envelope:
    """Seals and opens objects for one repository (its keys and compression level)."""

    def __init__(self, keys: Keys | None, compression_level: int = 3) -> None:
        self.keys = keys
        self.cipher_code = CIPHER_CODES[keys.cipher] if keys else 0
        self._aead = keys.aead() if keys else None
        self.compression_level = compression_level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            comp = self._local.compressor = zstandard.ZstdCompressor(level=self.compression_level)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "decompressor", None)
        if dec is None:
            dec = self._local.decompressor = zstandard.ZstdDecompressor()
        return dec

    def seal(self, kind: int, binding: str, data: bytes, *, compress: bool = True) -> bytes:
        """Compress (when it helps), then encrypt or checksum `data` for storage."""
        compression = COMPRESSION_NONE
        payload = data
        if compress and data:
            packed = self._compressor().compress(data)
            if len(packed) < len(data):
                compression, payload = COMPRESSION_ZSTD, packed
        header = HEADER.pack(MAGIC, kind, compression, self.cipher_code, 0)
        aad = header + binding.encode()
        if self._aead is not None:
            nonce = os.urandom(NONCE_SIZE)
            return header + nonce + self._aead.encrypt(nonce, payload, aad)
        return header + payload + _checksum(aad, payload)

    def open(self, kind: int, binding: str, blob: bytes) -> bytes:
        """Check and unpack a stored object; raise DamagedData when it fails any check."""
        if len(blob) < HEADER.size + 16 or blob[:4] != MAGIC:
            raise DamagedData(f"object {binding} is damaged (bad header or truncated)")
        header = blob[: HEADER.size]
        _magic, got_kind, compression, cipher, _ = HEADER.unpack(header)
        if got_kind != kind:
            raise DamagedData(f"object {binding} is damaged (wrong object kind {got_kind})")
        if cipher != self.cipher_code:
            raise DamagedData(f"object {binding} is damaged (cipher {cipher} does not match the repository)")
        aad = header + binding.encode()
        body = memoryview(blob)[HEADER.size :]
        if self._aead is not None:
            try:
                payload = self._aead.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], aad)  # views: no copies
            except InvalidTag:
                raise DamagedData(f"object {binding} is damaged (authentication failed)") from None
        else:
            payload, checksum = bytes(body[:-32]), bytes(body[-32:])
            if _checksum(aad, payload) != checksum:
                raise DamagedData(f"object {binding} is damaged (checksum mismatch)")
        if compression == COMPRESSION_ZSTD:
            try:
                return self._decompressor().decompress(payload)
            except zstandard.ZstdError:
                raise DamagedData(f"object {binding} is damaged (cannot decompress)") from None
        if compression != COMPRESSION_NONE:
            raise DamagedData(f"object {binding} is damaged (unknown compression {compression})")
        return payload


def _checksum(aad: bytes, payload: bytes) -> bytes:
    hasher = blake3.blake3(aad)
    hasher.update(payload)
    return hasher.digest()
