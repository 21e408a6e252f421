"""Ship transaction logs between image backups: closed WAL / binary logs into the repository, then off the server.

A log is removed on the server only after its record is durable in the repository (it is then
"safely in the repository"). Records older than the first log the oldest image point of the name
needs are forgotten (repo/logstore.py); garbage collection then frees their chunks. The job holds
a `backup` lock, so garbage collection keeps the chunks it is writing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.catalog import Catalog
from surepoint.consistency.log_sources import LOG_SOURCES
from surepoint.consistency.runner import CommandRunner, HostRunner
from surepoint.errors import ConfigError, SurepointError
from surepoint.events import EventRecorder
from surepoint.interrupt import at_stake, checkpoint
from surepoint.jobs.job_file import JobConfig
from surepoint.repo.locks import repository_lock
from surepoint.repo.logstore import LogStore
from surepoint.repo.repository import Repository
from surepoint.timestamps import utc_now

START_LOG = {"postgresql": "start_wal_file", "mariadb": "binlog_file"}


@dataclass
class ShipReport:
    writer: str
    shipped: list[str] = field(default_factory=list)  # stored by this run
    already: list[str] = field(default_factory=list)  # were in the repository already
    removed_on_server: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)  # records no image point needs any more

    def to_json(self) -> dict:
        return dict(self.__dict__)


class LogConflict(SurepointError):
    """A log file of that name is stored already, with other contents."""


def archive_wal(repository: Repository, catalog: Catalog, name: str, path: str, file: str) -> str:
    """PostgreSQL's archive_command: store one closed WAL file; storing the same file again succeeds.

    PostgreSQL may call archive_command again for a file it archived before a crash; the same
    contents are then a success, other contents an error (exit status 1): the file stays in
    pg_wal and PostgreSQL retries, and nothing stored is overwritten.
    """
    with open(path, "rb") as f:
        data = f.read()
    store = LogStore(repository)
    recorder = EventRecorder(catalog, repository.id, source=name)
    if store.has(name, "postgresql", file):
        if store.read(store.get(name, "postgresql", file)) == data:
            return "already in the repository"
        recorder("postgresql", "ship-logs", "failed", f"{file}: stored already with other contents")
        raise LogConflict(f"{file} is stored already with other contents: not overwritten")
    with repository_lock(repository.backend, "backup"):
        store.put(name, "postgresql", file, data, utc_now())
    recorder("postgresql", "ship-logs", "ok", f"archived {file} ({len(data)} bytes)")
    return "stored"


def first_needed_log(repository: Repository, name: str, writer: str) -> str | None:
    """The log the oldest image point of `name` starts from: every older log is useless."""
    starts = [
        ((p.metadata.get("writers") or {}).get(writer) or {}).get(START_LOG[writer])
        for p in repository.list_restore_points()
        if p.name == name
    ]
    starts = [s for s in starts if s]
    return min(starts) if starts else None


def ship_logs(
    repository: Repository,
    catalog: Catalog,
    job: JobConfig,
    *,
    runner: CommandRunner | None = None,
    inventory: str | None = None,
    say: Callable[[str], None] = lambda m: None,
) -> list[ShipReport]:
    """Ship the closed logs of the job's writers (on this host, or inside the job's VM)."""
    configs = [w for w in job.writers if w["type"] in LOG_SOURCES]
    if not configs:
        raise ConfigError(f"{job.path}: no postgresql or mariadb writer: no logs to ship")
    with contextlib.ExitStack() as stack:
        if job.vm:
            sources = guest_sources(stack, job, inventory)
        else:
            host = runner or HostRunner()
            sources = {w: (lambda config, w=w: LOG_SOURCES[w](host, config)) for w in LOG_SOURCES}
        return _ship(repository, catalog, job, configs, sources, say)


def guest_sources(stack: contextlib.ExitStack, job: JobConfig, inventory: str | None) -> dict:
    """Log sources inside the job's VM, through its guest agent (and a port hot-plugged for the copy)."""
    from surepoint.consistency.guest_log_sources import GUEST_LOG_SOURCES
    from surepoint.consistency.guest_runner import GuestRunner
    from surepoint.consistency.guest_transfer import GuestTransfer
    from surepoint.vm.inventory import find_vm, guest_agent_for
    from surepoint.vm.libvirt_domain import open_qmp

    vm = find_vm(job.vm or "", inventory)
    agent = stack.enter_context(guest_agent_for(vm.name, inventory))
    runner = GuestRunner(agent, vm.name)
    transfer = GuestTransfer(runner, lambda: open_qmp(vm))
    return {w: (lambda config, w=w: GUEST_LOG_SOURCES[w](runner, config, transfer)) for w in GUEST_LOG_SOURCES}


def _ship(repository, catalog, job, configs, sources, say) -> list[ShipReport]:
    store = LogStore(repository)
    reports = []

    recorder = EventRecorder(catalog, repository.id, source=job.name)

    def event(component: str, outcome: str, message: str) -> None:
        recorder(component, "ship-logs", outcome, message)
        say(f"{component} ship-logs: {outcome} {message}")

    failures: list[Exception] = []  # one writer's failure does not stop the others
    shipped: list[str] = []

    def left() -> str:
        return (
            f"{len(shipped)} log file(s) shipped and recorded before the interruption; a file being shipped has "
            "no record (the next run ships it again) and nothing more was removed on the server"
        )

    def record(message: str) -> None:
        recorder("job", "ship-logs", "failed", message)

    with at_stake(left, record), repository_lock(repository.backend, "backup"):
        for config in configs:
            writer = config["type"]
            report = ShipReport(writer)
            try:
                source = sources[writer]({k: v for k, v in config.items() if k != "type"})
                closed = source.closed_logs()
                new = []
                for log in closed:
                    if store.has(job.name, writer, log.file):
                        report.already.append(log.file)
                    else:
                        new.append(log)
                for log, data in source.read(new):
                    store.put(job.name, writer, log.file, data, log.covers_until)
                    report.shipped.append(log.file)
                    shipped.append(log.file)
                    checkpoint("ship-log")
                report.removed_on_server = source.remove_shipped(closed)
                keep_from = first_needed_log(repository, job.name, writer)
                if keep_from:
                    report.forgotten = store.forget_before(job.name, writer, keep_from)
            except (SurepointError, OSError) as exc:
                event(writer, "failed", f"{exc}; shipped {len(report.shipped)} before the failure, nothing removed")
                failures.append(exc)
                continue
            message = (
                f"shipped {len(report.shipped)}"
                + (f" ({report.shipped[0]} .. {report.shipped[-1]})" if report.shipped else "")
                + f", {len(report.already)} already in the repository; removed on the server: "
                + f"{len(report.removed_on_server)}; records no longer needed: {len(report.forgotten)}"
            )
            event(writer, "ok", message)
            reports.append(report)
    if failures:
        raise failures[0]  # its exit code; every writer's outcome is in the events and said above
    return reports
