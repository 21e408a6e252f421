"""Application-aware restore: one application out of a restore point, in the application's own order.

The restore point is mounted read-only (surepoint/mount), the writer's restore rules run
pre_restore -> restore -> post_restore (surepoint/consistency/restore.py), each phase an event of
the restore point. With a time, the last image point taken before it is chosen and the logs
shipped into the repository after it (repo/logstore.py) are replayed up to that time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from surepoint.catalog import Catalog
from surepoint.consistency.restore import RestoreReport, RestoreRequest, run_restore
from surepoint.consistency.restore_registry import RESTORE_WRITERS
from surepoint.consistency.runner import CommandRunner, HostRunner
from surepoint.errors import InvalidArgument, RestorePointNotFound, SurepointError
from surepoint.events import EventRecorder
from surepoint.repo.logstore import LogRecord, LogStore
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.timestamps import parse_utc


class PointInTimeError(InvalidArgument):
    """The requested time cannot be reached from what the repository holds."""


@dataclass
class AppRestoreOptions:
    writer: str
    ref: str  # NAME, NAME:latest, or a restore point id (prefix)
    target: str
    at: datetime | None = None
    port: int | None = None
    socket: str | None = None
    os_user: str | None = None
    start: bool = True
    archive: bool = True
    replica_of: str | None = None  # restore as a replica of this primary (PostgreSQL conninfo, MariaDB host=...)
    overwrite: bool = False
    timeout: float = 300.0
    vm: str | None = None  # restore inside this running VM, through its guest agent
    service: str | None = None  # in a VM: the systemd unit of the application (default: found)
    inventory: str | None = None  # VM inventory file (how to reach the VM)


@dataclass
class AppRestoreResult:
    point: RestorePoint
    writer: str
    target: str
    at: datetime | None
    logs: list[str] = field(default_factory=list)
    report: RestoreReport = field(default_factory=RestoreReport)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "restore_point": self.point.id,
            "name": self.point.name,
            "writer": self.writer,
            "target": self.target,
            "at": self.at.isoformat() if self.at else None,
            "logs_replayed": self.logs,
            "phases": [{"phase": p, "message": m} for p, m in self.report.phases],
            "details": self.report.details,
            "seconds": round(self.seconds, 3),
        }


def snapshot_time(point: RestorePoint, writer: str) -> datetime:
    """A moment at or after the point's snapshot: the writer's record of it, else the commit time."""
    meta = (point.metadata.get("writers") or {}).get(writer) or {}
    return parse_utc(meta.get("snapshot_time") or point.created)


def writer_metadata(point: RestorePoint, writer: str) -> dict:
    meta = (point.metadata.get("writers") or {}).get(writer)
    if meta is None:
        raise InvalidArgument(
            f"restore point {point.id} ({point.name}) holds no {writer} data: its job had no {writer} writer"
        )
    return meta


def choose_point(repository: Repository, ref: str, writer: str, at: datetime | None) -> RestorePoint:
    """The point `ref` names; with a time, the last point of that name taken before it."""
    name = ref.removesuffix(":latest")
    named = [
        p for p in repository.list_restore_points() if p.name == name and writer in (p.metadata.get("writers") or {})
    ]
    if not named:
        point = repository.latest_named(name) or repository.resolve(ref)
        writer_metadata(point, writer)
        if at is not None and snapshot_time(point, writer) > at:
            raise PointInTimeError(
                f"{_fmt(at)} is before restore point {point.id} was taken ({_fmt(snapshot_time(point, writer))})"
            )
        return point
    if at is None:
        return named[-1]
    before = [p for p in named if snapshot_time(p, writer) <= at]
    if not before:
        first = min(snapshot_time(p, writer) for p in named)
        raise PointInTimeError(f"{_fmt(at)} is before the first restore point of {name} ({_fmt(first)})")
    return max(before, key=lambda p: snapshot_time(p, writer))


def logs_for(store: LogStore, point: RestorePoint, writer: str, at: datetime) -> list[LogRecord]:
    """The shipped logs that take `point` forward to `at`, in replay order; clear errors when they cannot."""
    meta = writer_metadata(point, writer)
    records = store.list(point.name, writer)
    if not records:
        raise PointInTimeError(f"no logs of {point.name} ({writer}) are in the repository: nothing to replay")
    if writer == "postgresql":
        first = meta.get("start_wal_file") or ""
        segments = [r for r in records if not r.file.endswith(".history") and r.file >= first]
        if not segments or segments[0].file != first:
            raise PointInTimeError(
                f"the WAL restore point {point.id} starts from ({first}) is not in the repository: "
                "logs were not shipped since that point"
            )
        needed = [r for r in records if r.file.endswith(".history")] + segments
    else:
        first = meta.get("binlog_file") or ""
        needed = [r for r in records if r.file >= first]
        if not needed or needed[0].file != first:
            raise PointInTimeError(
                f"the binary log restore point {point.id} was taken in ({first}) is not in the repository: "
                "logs were not shipped since that point"
            )
        # mariadb-binlog would replay across a gap without a word: the sequence must be whole.
        for before, after in zip(needed, needed[1:], strict=False):
            if _binlog_number(after.file) != _binlog_number(before.file) + 1:
                raise PointInTimeError(
                    f"binary logs between {before.file} and {after.file} are not in the repository "
                    "(pruned on the server before they were shipped?)"
                )
    last = max(parse_utc(r.covers_until) for r in needed)
    if at > last:
        raise PointInTimeError(
            f"{_fmt(at)} is after the last shipped log of {point.name} (it covers until {_fmt(last)})"
        )
    return needed


def _binlog_number(file: str) -> int:
    suffix = file.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


@contextlib.contextmanager
def mounted_point(repository: Repository, point: RestorePoint, say: Callable[[str], None]) -> Iterator[list[str]]:
    """The point's filesystems, mounted read-only for the block: a live mount is reused, else one is made."""
    from surepoint.jobs.guest_volumes import mount_options
    from surepoint.mount.borrowed import point_mounted

    with point_mounted(repository, point, mount_options(), purpose="restore-app", say=say) as state:
        if not state.mounts:
            raise SurepointError(f"restore point {point.id} has no filesystem this host can mount")
        yield [m["path"] for m in state.mounts]


def guest_target(options: AppRestoreOptions, meta: dict) -> str:
    """Where the application goes in the guest: --to, else where it was at the backup."""
    if options.target:
        if not options.target.startswith("/"):
            raise InvalidArgument(f"{options.target!r}: give an absolute path in the guest")
        return options.target.rstrip("/") or "/"
    original = {"postgresql": meta.get("data_directory"), "mariadb": meta.get("datadir")}.get(options.writer, "")
    if options.writer != "sqlite" and not original:
        raise InvalidArgument(f"the restore point does not say where {options.writer}'s data was: give --to")
    return (original or "").rstrip("/")


@contextlib.contextmanager
def guest_writer(options: AppRestoreOptions) -> Iterator:
    """The writer's in-guest restore rules, on an open guest-agent connection to the VM."""
    from surepoint.consistency.guest_runner import GuestRunner
    from surepoint.consistency.guest_transfer import GuestTransfer
    from surepoint.consistency.restore_guest import GUEST_RESTORE_WRITERS
    from surepoint.vm.inventory import find_vm, guest_agent_for
    from surepoint.vm.libvirt_domain import open_qmp

    vm = find_vm(options.vm or "", options.inventory)
    agent = guest_agent_for(vm.name, options.inventory)
    with agent:
        runner = GuestRunner(agent, vm.name)
        transfer = GuestTransfer(runner, lambda: open_qmp(vm), timeout=max(options.timeout, 600.0))
        yield GUEST_RESTORE_WRITERS[options.writer](runner, transfer)


def restore_application(
    repository: Repository,
    catalog: Catalog,
    options: AppRestoreOptions,
    *,
    runner: CommandRunner | None = None,
    say: Callable[[str], None] = lambda m: None,
) -> AppRestoreResult:
    started = time.monotonic()
    writer_class = RESTORE_WRITERS.get(options.writer)
    if writer_class is None:
        raise InvalidArgument(f"no restore rules for {options.writer!r}; known: {', '.join(sorted(RESTORE_WRITERS))}")
    if options.at is not None and not writer_class.supports_point_in_time:
        raise InvalidArgument(f"{options.writer} keeps no log history: a point in time cannot be restored")
    if options.replica_of and (options.writer == "sqlite" or options.at is not None):
        raise InvalidArgument(
            "a restore as a replica is for PostgreSQL and MariaDB, without a point in time (it follows the primary "
            "to the present)"
        )
    if options.vm and (options.replica_of or options.port or options.socket or options.os_user):
        raise InvalidArgument(
            "inside a VM the application comes back as its own service: no port, socket, user or replica"
        )
    if options.at is not None and options.writer == "mariadb" and options.at.microsecond:
        raise InvalidArgument("MariaDB's binary log records whole seconds: give the time to the second")
    try:
        point = choose_point(repository, options.ref, options.writer, options.at)
    except RestorePointNotFound:
        raise RestorePointNotFound(f"no restore point or name {options.ref!r} with {options.writer} data") from None
    meta = writer_metadata(point, options.writer)
    records: list[LogRecord] = []
    store = LogStore(repository)
    if options.at is not None:
        records = logs_for(store, point, options.writer, options.at)

    stack = contextlib.ExitStack()
    guest = stack.enter_context(guest_writer(options)) if options.vm else None  # no agent: refused before anything
    with stack:
        return _restore(repository, catalog, options, point, meta, store, records, guest, runner, say, started)


def _restore(
    repository, catalog, options, point, meta, store, records, guest, runner, say, started
) -> AppRestoreResult:
    writer_class = RESTORE_WRITERS[options.writer]
    recorder = EventRecorder(catalog, repository.id, point.id, point.name)

    def event(component: str, phase: str, outcome: str, message: str = "") -> None:
        recorder(component, phase, outcome, message)
        say(f"{component} {phase}: {outcome} {message}".rstrip())

    where = options.target or "its place at the backup"
    what = f"restore of {options.writer} from {point.id} to " + (f"VM {options.vm}: {where}" if options.vm else where)
    if options.at is not None:
        what += f" as of {_fmt(options.at)} ({len(records)} log file(s) to replay)"
    event("restore-app", "start", "ok", what)
    log_dir = tempfile.mkdtemp(prefix="surepoint-logs-") if records else None
    try:
        for record in records:
            path = os.path.join(log_dir, record.file)
            with open(path, "wb") as f:
                f.write(store.read(record))
            os.chmod(path, 0o600)
        request = RestoreRequest(
            point_id=point.id,
            roots=[],
            target=guest_target(options, meta) if options.vm else os.path.abspath(options.target),
            metadata=meta,
            at=options.at,
            log_dir=log_dir,
            log_files=[r.file for r in records if not r.file.endswith(".history")],
            port=options.port,
            socket=options.socket,
            os_user=options.os_user,
            start=options.start,
            archive=options.archive,
            replica_of=options.replica_of,
            overwrite=options.overwrite,
            timeout=options.timeout,
            service=options.service,
        )
        with mounted_point(repository, point, say) as roots:
            request.roots = roots
            if guest is not None:
                report = run_restore(guest, request, event)
            else:
                report = run_restore(writer_class(runner or HostRunner()), request, event)
    except BaseException as exc:
        event("restore-app", "finish", "failed", str(exc) or type(exc).__name__)
        raise
    finally:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
    result = AppRestoreResult(
        point, options.writer, request.target, options.at, [r.file for r in records], report, time.monotonic() - started
    )
    event("restore-app", "finish", "ok", f"{options.writer} restored in {result.seconds:.1f} s")
    return result
