"""What every explore engine shares: the overlay, the throw-away server's start and stop, the export sink.

Item-level recovery: databases, tables or rows out of a restore point, without restoring it.

The restore point is mounted read-only (surepoint/mount: chunks are read on demand); the
application's files found there become the lower layer of an overlay whose upper layer is a
private temporary directory, and a throw-away server of the application (PostgreSQL of the
cluster's major version, mariadbd) starts on the overlay: its crash recovery writes only to the
upper layer, the restore point is never written. It listens on a private unix socket only and is
stopped and removed with the overlay when the command ends. SQLite needs no server: the database
is opened on the overlay. Exports go to a temporary name (mode 0600), renamed when complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from surepoint.consistency.runner import one_line
from surepoint.errors import InvalidArgument, SurepointError
from surepoint.repo.manifest import RestorePoint

START_TIMEOUT = 300.0


class ExploreError(SurepointError):
    """The throw-away server could not start, or the item asked for is not there."""


@dataclass
class TableInfo:
    database: str
    table: str
    rows: int  # an estimate for servers (-1: never analysed), exact for SQLite
    bytes: int


@dataclass
class ExportResult:
    point: RestorePoint
    item: str
    target: str
    format: str
    rows: int = 0
    bytes: int = 0
    first_row_seconds: float | None = None  # from the start of the command
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "restore_point": self.point.id,
            "item": self.item,
            "target": self.target,
            "format": self.format,
            "rows": self.rows,
            "bytes": self.bytes,
            "first_row_seconds": None if self.first_row_seconds is None else round(self.first_row_seconds, 3),
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


class Explorer(Protocol):
    title: str  # what answers, e.g. "PostgreSQL 15"
    table_formats: tuple[str, ...]  # the first is the default for a table
    database_formats: tuple[str, ...]  # the first is the default for a whole database

    def list_tables(self) -> list[TableInfo]: ...

    def export(self, item: str, tmp: str, *, where: str | None, fmt: str, sink: ExportSink) -> None: ...


def split_item(item: str) -> tuple[str, str | None, str | None]:
    """DB, DB.TABLE or DB.SCHEMA.TABLE -> (database, schema, table)."""
    parts = item.split(".")
    if not all(parts) or len(parts) > 3:
        raise InvalidArgument(f"{item!r} is not DB, DB.TABLE or DB.SCHEMA.TABLE")
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def owner_ids(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


class Overlay:
    """A writable view of a read-only directory: changes land in a private upper layer, all removed at the end.

    `scratch` is a private directory beside it for sockets, logs and settings; both belong to
    `uid`, the user the throw-away server runs as.
    """

    def __init__(self, lower: str, uid: int, gid: int) -> None:
        self.lower, self.uid, self.gid = lower, uid, gid
        self.mounted = False

    def __enter__(self) -> Overlay:
        self.dir = tempfile.mkdtemp(prefix="surepoint-explore-")
        os.chmod(self.dir, 0o711)  # the server's user passes through to its own private directories
        try:
            upper, work, self.path, self.scratch = (
                os.path.join(self.dir, d) for d in ("upper", "work", "data", "scratch")
            )
            for d in (upper, work, self.path, self.scratch):
                os.mkdir(d, 0o700)
                os.chown(d, self.uid, self.gid)
            options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
            mounted = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", options, self.path], capture_output=True, text=True
            )
            if mounted.returncode != 0:
                raise ExploreError(f"cannot make a writable overlay of {self.lower}: {one_line(mounted.stderr)}")
            self.mounted = True
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.mounted and subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", self.path], capture_output=True)
        self.mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until_ready(
    name: str, proc: subprocess.Popen, ready: Callable[[], bool], log: str, timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise ExploreError(f"the throw-away {name} exited: {log_tail(log)}")
        if time.monotonic() > deadline:
            raise ExploreError(f"the throw-away {name} did not start within {timeout:.0f} s: {log_tail(log)}")
        time.sleep(0.1)


def log_tail(log: str) -> str:
    try:
        with open(log, errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    severe = [line for line in lines if any(w in line for w in ("FATAL", "PANIC", "ERROR"))]
    return one_line((severe or lines or ["(no log)"])[-1])[-300:]


def stop_process(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ExportSink:
    """Counts what an export writes and notes when its first row arrived."""

    def __init__(self, started: float, result: ExportResult) -> None:
        self.started, self.result = started, result

    def first_row(self) -> None:
        if self.result.first_row_seconds is None:
            self.result.first_row_seconds = time.monotonic() - self.started

    def stream(self, argv: list[str], tmp: str, *, env: dict, owner: dict, csv_lines: bool) -> None:
        """Copy a command's output to `tmp`; with csv_lines, the first line is a header, then a row per line."""
        lines = 0
        with (
            open_private(tmp) as out,
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **owner) as proc,
        ):
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                out.write(chunk)
                self.result.bytes += len(chunk)
                lines += chunk.count(b"\n")
                if lines >= 2 or not csv_lines:
                    self.first_row()
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode != 0:
            raise ExploreError(f"export failed: {one_line(err)}")
        if csv_lines:  # quoted newlines inside values would count twice; exports rarely hold them
            self.result.rows = max(lines - 1, 0)

    def write_csv(self, header: list[str], rows: Iterable[list], tmp: str) -> None:
        with open_private(tmp) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            writer = csv.writer(text)
            writer.writerow(header)
            for row in rows:
                writer.writerow(row)
                self.result.rows += 1
                if self.result.rows == 1:
                    text.flush()
                    self.first_row()
            text.flush()
            self.result.bytes = raw.tell()
            text.detach()


@contextlib.contextmanager
def open_private(path: str) -> Iterator:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        yield f


def quote_ident(name: str, quote: str = '"') -> str:
    return quote + name.replace(quote, quote * 2) + quote


def sql_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
