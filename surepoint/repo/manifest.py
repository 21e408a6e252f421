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
        """The manifest, its every field checked (ValueError or TypeError when one is wrong): a
        checksum proves the bytes were written so, not that they make sense."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a manifest is a JSON object")
        raw.pop("version", None)
        _check_fields(raw, POINT_FIELDS, "restore point")
        if not raw["disks"] or not all(isinstance(d, dict) for d in raw["disks"]):
            raise ValueError("disks: a non-empty list of objects")
        for disk in raw["disks"]:
            _check_fields(disk, DISK_FIELDS, "disk")
        if raw.get("consistency", "crash") not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency {raw['consistency']!r} is not one of {', '.join(CONSISTENCY_LEVELS)}")
        raw["disks"] = [DiskRecord(**d) for d in raw["disks"]]
        return cls(**raw)


# Field -> (accepted types, required). bool is an int in Python: never accepted for a number.
_NUMBER = (int, float)
POINT_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True),
    "name": ((str,), True),
    "created": ((str,), True),
    "source": ((dict,), True),
    "disks": ((list,), True),
    "consistency": ((str,), False),
    "parent": ((str, type(None)), False),
    "host": ((str,), False),
    "duration_seconds": (_NUMBER, False),
    "metadata": ((dict,), False),
}
DISK_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "number": ((int,), True),
    "name": ((str,), True),
    "size": ((int,), True),
    "chunk_size": ((int,), True),
    "index": ((str,), True),
    "read_bytes": ((int,), False),
    "new_chunks": ((int,), False),
    "new_bytes": ((int,), False),
    "stored_bytes": ((int,), False),
    "reused_chunks": ((int,), False),
    "zero_chunks": ((int,), False),
    "metadata": ((dict,), False),
}


def _check_fields(raw: dict, fields: dict[str, tuple[tuple[type, ...], bool]], what: str) -> None:
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for key, (types, required) in fields.items():
        if key not in raw:
            if required:
                raise ValueError(f"{what}: {key} is missing")
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{what}: {key} has the wrong type")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{what}: {key} is negative")
        if isinstance(value, float) and not (0 <= value < float("inf")):
            raise ValueError(f"{what}: {key} is not a finite positive number")
        if key in ("id", "name", "created", "index") and not value:
            raise ValueError(f"{what}: {key} is empty")
    if what == "disk" and not (0 < raw["chunk_size"] <= 1 << 30):
        raise ValueError("disk: chunk_size out of range")


def peek_name_and_time(data: bytes) -> tuple[str | None, str | None]:
    """The name and creation time a damaged manifest still shows, if it shows them (for `NAME:latest`)."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    name, created = raw.get("name"), raw.get("created")
    return (name if isinstance(name, str) else None), (created if isinstance(created, str) else None)
