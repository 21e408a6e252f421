"""The restore side of the writers: pre_restore -> restore -> post_restore, each recorded as an event.

A backup runs writers around the snapshot (writer.py); a restore runs the same application's
rules in its own order: pre_restore (check the target, stop the service that owns it), restore
(put the data back and set up what the application needs to recover: no stale pid file, recovery
settings, the logs to replay), post_restore (start, wait until it answers, check). The data is
read from a mounted restore point; the writer finds its files there from the paths it recorded
at backup time.
"""

from __future__ import annotations

import os
import pwd
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from surepoint.consistency.runner import CommandFailed, CommandRunner
from surepoint.errors import InvalidArgument, SurepointError

EventSink = Callable[[str, str, str, str], None]  # (writer, phase, outcome, message)


class RestorePhase(Enum):
    PRE_RESTORE = "pre-restore"
    RESTORE = "restore"
    POST_RESTORE = "post-restore"


class RestoreFailed(SurepointError):
    """A restore phase failed; the message names the writer and the phase."""


class TargetInUse(InvalidArgument):
    """The restore target holds data and replacing it was not asked for."""


@dataclass
class RestoreRequest:
    """What one application restore needs: where the point's files are readable, where they go, how."""

    point_id: str
    roots: list[str]  # the restore point's filesystems, mounted read-only
    target: str  # the data directory (or database file) to restore into
    metadata: dict  # what the writer recorded at backup time
    at: datetime | None = None  # point-in-time target (aware, UTC)
    log_dir: str | None = None  # log files fetched from the repository for replay
    log_files: list[str] = field(default_factory=list)  # their names in replay order
    port: int | None = None
    socket: str | None = None  # socket directory (PostgreSQL) or socket file (MariaDB)
    os_user: str | None = None  # owner of the restored files and the service's user
    start: bool = True
    archive: bool = True  # PostgreSQL: keep the restored cluster's archive_command
    replica_of: str | None = None  # PostgreSQL: come back as a standby streaming from this primary (conninfo)
    overwrite: bool = False  # move existing data at the target aside instead of failing
    timeout: float = 300.0
    service: str | None = None  # in a guest: the application's systemd unit (default: found)


@dataclass
class RestoreReport:
    phases: list[tuple[str, str]] = field(default_factory=list)  # (phase, message)
    details: dict = field(default_factory=dict)


class RestoreWriter:
    """One application's restore rules. Subclasses implement the three phases."""

    name = "writer"
    supports_point_in_time = False

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner
        self.details: dict = {}

    def pre_restore(self, request: RestoreRequest) -> str:
        return ""

    def restore(self, request: RestoreRequest) -> str:
        return ""

    def post_restore(self, request: RestoreRequest) -> str:
        return ""


def run_restore(writer: RestoreWriter, request: RestoreRequest, events: EventSink) -> RestoreReport:
    """Run the phases in order; each writes an event. The first failure stops the restore."""
    report = RestoreReport()
    for phase, step in (
        (RestorePhase.PRE_RESTORE, writer.pre_restore),
        (RestorePhase.RESTORE, writer.restore),
        (RestorePhase.POST_RESTORE, writer.post_restore),
    ):
        started = time.monotonic()
        try:
            message = step(request)
        except (SurepointError, OSError) as exc:
            text = str(exc) if isinstance(exc, SurepointError) else f"{exc.strerror or exc}: {exc.filename or ''}"
            events(writer.name, phase.value, "failed", text)
            if isinstance(exc, InvalidArgument):
                raise
            raise RestoreFailed(f"{writer.name} {phase.value}: {text}") from None
        message = (
            f"{message} ({time.monotonic() - started:.1f} s)" if message else f"{time.monotonic() - started:.1f} s"
        )
        events(writer.name, phase.value, "ok", message)
        report.phases.append((phase.value, message))
    report.details = dict(writer.details)
    return report


# helpers shared by the writers' restore rules --------------------------------------------------


def find_in_point(roots: list[str], original: str, marker: str) -> str:
    """Where `original` (a path on the backed-up machine) is in the mounted point.

    The point's filesystems are mounted somewhere else than they were on the source, so try the
    path with its leading directories removed, longest first, below every mounted volume; the
    first that holds `marker` (PG_VERSION, a database's own file) wins.
    """
    parts = [p for p in original.split("/") if p]
    for k in range(len(parts)):
        rest = parts[k:]
        for root in roots:
            candidate = os.path.join(root, *rest)
            if os.path.exists(os.path.join(candidate, marker) if marker else candidate):
                return candidate
    raise RestoreFailed(f"{original} is not in the restore point (searched {', '.join(roots) or 'no filesystem'})")


def prepare_target_dir(target: str, overwrite: bool) -> str | None:
    """Make sure `target` can receive a data directory; with overwrite, move what is there aside.

    Returns where the old contents went (None when the target was absent or empty).
    """
    if os.path.lexists(target) and not os.path.isdir(target):
        raise TargetInUse(f"{target} exists and is not a directory")
    if not os.path.isdir(target) or not os.listdir(target):
        return None
    if not overwrite:
        raise TargetInUse(f"{target} is not empty; to replace it (the old contents are kept aside), allow overwriting")
    aside = f"{target.rstrip('/')}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(target, aside)
    return aside


def copy_tree(runner: CommandRunner, source: str, target: str, timeout: float) -> None:
    """Copy a directory's contents with owners, modes, times, links and holes (cp -a)."""
    os.makedirs(target, exist_ok=True)
    runner.run(["cp", "-a", "--sparse=always", "--", os.path.join(source, "."), target], timeout=timeout).check()


def owner_of(path: str) -> tuple[str, int, int]:
    """(user name, uid, gid) owning `path`; the uid itself as the name when this host has no such user."""
    st = os.stat(path)
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return name, st.st_uid, st.st_gid


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:] if line.strip())
    except OSError:
        return ""


def which(tool: str, *candidates: str) -> str:
    for path in candidates:
        if os.path.exists(path):
            return path
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise CommandFailed(f"{tool} is not installed here")
    return found
