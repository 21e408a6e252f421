"""The restore-point manifest: what a restore point holds. Written last; its presence commits the point."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

CONSISTENCY_LEVELS = ("application", "filesystem", "crash")


@dataclass
class DiskRecord:
    """One disk of a restore point and what its backup did."""

    number: int
    name: str
    size: int
    chunk_size: int
    index: str  # object name of its fixed index
    read_bytes: int = 0  # bytes read from the source
    new_chunks: int = 0
    new_bytes: int = 0  # uncompressed size of the chunks this backup stored
    stored_bytes: int = 0  # what those chunks take in the repository
    reused_chunks: int = 0
    zero_chunks: int = 0
    metadata: dict = field(default_factory=dict)


@dataclass
class RestorePoint:
    id: str
    name: str
    created: str  # ISO 8601, UTC
    source: dict
    disks: list[DiskRecord]
    consistency: str = "crash"
    parent: str | None = None
    host: str = ""
    duration_seconds: float = 0.0
    metadata: dict = field(default_factory=dict)

    @property
    def bootable(self) -> bool:
        """A VM backup with its saved QEMU command line: something a recovery lab can boot."""
        return bool((self.metadata.get("vm") or {}).get("command_line"))

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RestorePoint:
        raw = json.loads(data)
        raw.pop("version", None)
        raw["disks"] = [DiskRecord(**d) for d in raw["disks"]]
        return cls(**raw)
