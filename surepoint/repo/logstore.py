"""Transaction logs shipped between image backups: PostgreSQL WAL files and MariaDB binary logs.

Each shipped log file is stored as ordinary chunks (deduplicated, compressed, encrypted like disk
data) plus one small record object that lists them:

    logs/<series key>/<writer>/<log file name>     KIND_RECORD envelope, JSON:
        {"version": 1, "name", "writer", "file", "size", "chunks": [hex ids in order],
         "shipped": ISO UTC, "covers_until": ISO UTC}

A series is the logs of one restore-point name and one writer (`pgdb` / `postgresql`); its key is
the repository's chunk-id function of the name, so names do not show in object names. A record is
written after its chunks and made durable last: its presence commits the log file, exactly as a
manifest commits a restore point. Garbage collection keeps every chunk a record lists
(`referenced_chunks`). Records go when no image point of their name needs them any more
(`forget_before`: older than the log the oldest image point starts from).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from surepoint.errors import DamagedData
from surepoint.repo.envelope import KIND_RECORD
from surepoint.repo.repository import Repository
from surepoint.storage.backend import ObjectNotFound
from surepoint.timestamps import utc_now

LOG_PREFIX = "logs/"


@dataclass
class LogRecord:
    name: str  # the restore-point name whose image points these logs extend
    writer: str  # "postgresql" | "mariadb"
    file: str  # the log file's own name (WAL segment, timeline history, binary log)
    size: int
    chunks: list[str] = field(default_factory=list)
    shipped: str = ""
    covers_until: str = ""  # every change made before this moment is in this file or an earlier one
    object: str = ""

    def to_json(self) -> bytes:
        data = asdict(self)
        data.pop("object")
        return json.dumps({"version": 1, **data}, sort_keys=True).encode()


class LogStore:
    """The log records of one repository."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.backend = repository.backend

    def series_prefix(self, name: str, writer: str) -> str:
        key = self.repository.chunks.chunk_id(b"log-series:" + name.encode()).hex()[:32]
        return f"{LOG_PREFIX}{key}/{writer}/"

    def _object(self, name: str, writer: str, file: str) -> str:
        if not file or "/" in file or file.startswith("."):
            raise ValueError(f"unexpected log file name {file!r}")
        return self.series_prefix(name, writer) + file

    def has(self, name: str, writer: str, file: str) -> bool:
        return self.backend.exists(self._object(name, writer, file))

    def put(self, name: str, writer: str, file: str, data: bytes, covers_until: str) -> LogRecord:
        """Store one log file: its chunks, a sync, then its record (durable)."""
        chunks = self.repository.chunks
        size = self.repository.chunk_size
        ids = []
        for offset in range(0, max(len(data), 1), size):
            piece = data[offset : offset + size]
            chunk_id = chunks.chunk_id(piece)
            if not chunks.claim_existing(chunk_id):
                chunks.put(chunk_id, piece)
            ids.append(chunk_id.hex())
        self.backend.sync()
        record = LogRecord(name, writer, file, len(data), ids, utc_now(), covers_until)
        record.object = self._object(name, writer, file)
        blob = self.repository.envelope.seal(KIND_RECORD, record.object, record.to_json())
        self.backend.put(record.object, blob, durable=True)
        return record

    def get(self, name: str, writer: str, file: str) -> LogRecord:
        return self._read(self._object(name, writer, file))

    def _read(self, object_name: str) -> LogRecord:
        try:
            raw = json.loads(self.repository.envelope.open(KIND_RECORD, object_name, self.backend.get(object_name)))
            raw.pop("version", None)
            return LogRecord(**raw, object=object_name)
        except ObjectNotFound:
            raise DamagedData(f"log record {object_name} is missing") from None
        except (ValueError, TypeError):
            raise DamagedData(f"log record {object_name} is damaged (unreadable)") from None

    def list(self, name: str, writer: str) -> list[LogRecord]:
        """The series' records, in log file name order (the order logs are written in)."""
        records = [self._read(info.name) for info in self.backend.list(self.series_prefix(name, writer))]
        return sorted(records, key=lambda r: r.file)

    def all_records(self) -> Iterator[LogRecord]:
        for info in self.backend.list(LOG_PREFIX):
            yield self._read(info.name)

    def read(self, record: LogRecord) -> bytes:
        data = b"".join(self.repository.chunks.get(bytes.fromhex(c)) for c in record.chunks)
        if len(data) != record.size:
            raise DamagedData(f"log file {record.file} is damaged (size does not match its record)")
        return data

    def delete(self, record: LogRecord) -> None:
        with contextlib.suppress(ObjectNotFound):
            self.backend.delete(record.object)

    def forget_before(self, name: str, writer: str, keep_from: str) -> list[str]:
        """Remove the records of log files older than `keep_from` (the first log any image point needs)."""
        gone = []
        for record in self.list(name, writer):
            if _log_order(record.file) < _log_order(keep_from):
                self.delete(record)
                gone.append(record.file)
        return gone


def _log_order(file: str) -> str:
    """WAL segment names sort by timeline then position; history files sort with their timeline's start."""
    return file.split(".", 1)[0] if file.endswith(".history") else file


def referenced_chunks(repository: Repository) -> set[bytes]:
    """Every chunk a log record lists: garbage collection keeps them."""
    ids: set[bytes] = set()
    for record in LogStore(repository).all_records():
        ids.update(bytes.fromhex(c) for c in record.chunks)
    return ids
