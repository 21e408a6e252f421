"""Recording what happens to restore points: who (component), what step (phase), how it went (outcome).

Every job records through an `EventRecorder` bound to one repository (and, once known, one
restore point and source). The catalog stores the events; `surepoint events` and the server show
them. Writers name themselves as components ("postgresql", "guest-fsfreeze"), so a component is a
`Component` or a writer's name; phases and outcomes are fixed vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol


class Component(StrEnum):
    JOB = "job"
    CBT = "cbt"
    COPY = "copy"
    GC = "gc"
    INSTANT = "instant"
    LAB = "lab"
    MOUNT = "mount"
    REPOSITORY = "repository"
    RESTORE = "restore"
    RETENTION = "retention"


class Phase(StrEnum):
    # jobs
    START = "start"
    SNAPSHOT = "snapshot"
    PLAN = "plan"
    COMMIT = "commit"
    CLEANUP = "cleanup"
    FINISH = "finish"
    # writers (application-aware processing)
    IDENTIFY = "identify"
    PREPARE = "prepare"
    FREEZE = "freeze"
    THAW = "thaw"
    POST_SNAPSHOT = "post-snapshot"
    BACKUP_COMPLETE = "backup-complete"
    ABORT = "abort"
    PRUNE_LOGS = "prune-logs"
    # repository and restore-point operations
    FORGET = "forget"
    SWEEP = "sweep"
    PASSWD = "passwd"
    DATA = "data"
    FILES = "files"
    VM = "vm"
    MOUNT = "mount"
    BOOT = "boot"
    VERIFY = "verify"
    MIGRATE = "migrate"
    DISCARD = "discard"
    SEND = "send"  # a copy job sent a restore point to another repository


class Outcome(StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"
    SKIPPED = "skipped"
    PENDING = "pending"


class EventStore(Protocol):
    """Where events go (the catalog)."""

    def add_event(
        self,
        repository: str,
        component: str,
        phase: str,
        outcome: str,
        message: str = "",
        *,
        restore_point: str | None = None,
        source: str | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class EventRecorder:
    """Records events of one repository into `store`; `echo` also shows those that are not `ok`.

    Callable as `recorder(component, phase, outcome, message)`, the shape writers and log
    handling expect of an event sink.
    """

    store: EventStore | None
    repository: str
    restore_point: str | None = None
    source: str | None = None
    echo: Callable[[str], None] | None = None

    def bound(self, *, restore_point: str | None = None, source: str | None = None) -> EventRecorder:
        """The same recorder, for one restore point and/or source."""
        return replace(
            self,
            restore_point=restore_point if restore_point is not None else self.restore_point,
            source=source if source is not None else self.source,
        )

    def record(
        self,
        component: Component | str,
        phase: Phase | str,
        outcome: Outcome | str = Outcome.OK,
        message: str = "",
        *,
        restore_point: str | None = None,
    ) -> None:
        point = restore_point or self.restore_point
        if self.store is not None:
            self.store.add_event(
                self.repository,
                str(component),
                str(phase),
                str(outcome),
                message,
                restore_point=point,
                source=self.source,
            )
        if self.echo is not None and outcome != Outcome.OK:
            self.echo(f"{component} {phase}: {outcome} {message}".rstrip())

    __call__ = record
