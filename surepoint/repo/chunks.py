"""The chunk store: content-addressed, compressed and optionally encrypted pieces of disk data."""

from __future__ import annotations

import blake3

from surepoint.errors import DamagedData
from surepoint.repo.envelope import KIND_CHUNK, Envelope
from surepoint.storage.backend import Backend, ObjectNotFound

DIGEST_SIZE = 32
ZERO_ID = bytes(DIGEST_SIZE)  # marks an all-zero chunk in an index; such chunks are never stored
CHUNK_PREFIX = "chunks/"
# Chunks garbage collection is about to delete (repo/gc.py). Where rename is not atomic (S3) a
# chunk waits there for one gc run, and a restore point that a backup committed meanwhile may
# still need it: reading falls back to it.
TRASH_PREFIX = "trash/"


def chunk_object_name(chunk_id: bytes) -> str:
    hexid = chunk_id.hex()
    return f"{CHUNK_PREFIX}{hexid[:2]}/{hexid}"


def chunk_id_from_name(name: str) -> bytes | None:
    """The chunk id of an object name under chunks/, or None for anything else."""
    base = name.rsplit("/", 1)[-1]
    if len(base) != DIGEST_SIZE * 2:
        return None
    try:
        return bytes.fromhex(base)
    except ValueError:
        return None


class ChunkStore:
    """Stores chunks under their id: BLAKE3 of the plaintext, keyed with a secret in encrypted repositories.

    The key makes ids useless for guessing content from the outside (a known file's hash does not
    reveal that the repository holds it).
    """

    def __init__(self, backend: Backend, envelope: Envelope, id_key: bytes | None) -> None:
        self.backend = backend
        self.envelope = envelope
        self._id_key = id_key

    def chunk_id(self, data: bytes) -> bytes:
        if self._id_key is not None:
            return blake3.blake3(data, key=self._id_key).digest()
        return blake3.blake3(data).digest()

    def put(self, chunk_id: bytes, data: bytes, *, durable: bool = False, compress: bool = True) -> int:
        """Store a chunk (uncompressed when not `compress`); return the bytes it takes in the backend."""
        blob = self.envelope.seal(KIND_CHUNK, chunk_id.hex(), data, compress=compress)
        self.backend.put(chunk_object_name(chunk_id), blob, durable=durable)
        return len(blob)

    def claim_existing(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored; also marks it as in use so garbage collection keeps it."""
        return self.backend.touch(chunk_object_name(chunk_id))

    def get(self, chunk_id: bytes) -> bytes:
        """Fetch, decrypt, decompress and check a chunk against its id."""
        try:
            blob = self.backend.get(chunk_object_name(chunk_id))
        except ObjectNotFound:
            try:
                blob = self.backend.get(TRASH_PREFIX + chunk_id.hex())
            except ObjectNotFound:
                raise DamagedData(f"chunk {chunk_id.hex()[:16]} is missing from the repository") from None
        data = self.envelope.open(KIND_CHUNK, chunk_id.hex(), blob)
        if self.chunk_id(data) != chunk_id:
            raise DamagedData(f"chunk {chunk_id.hex()[:16]} is damaged (content does not match its id)")
        return data
