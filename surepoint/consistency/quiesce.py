"""Run writers around a snapshot: freeze for the shortest time, always thaw, fall back by policy.

The consistency level reached is "application" when every application writer froze and thawed
in time, "filesystem" when only filesystem writers did, "crash" otherwise. With fallback
"require", anything short of application consistency fails the job before any data is read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from surepoint.consistency.writer import Writer
from surepoint.errors import SurepointError

T = TypeVar("T")
EventSink = Callable[[str, str, str, str], None]  # (writer, phase, outcome, message)

LEVELS = ("crash", "filesystem", "application")


class ConsistencyRequired(SurepointError):
    """Fallback policy "require" and the application step failed."""


@dataclass
class QuiesceOutcome:
    level: str
    failures: list[str] = field(default_factory=list)
    freeze_seconds: float = 0.0
    writer_metadata: dict[str, dict] = field(default_factory=dict)


class Quiescer:
    """One job's writers on one source."""

    def __init__(
        self,
        writers: list[Writer],
        *,
        fallback: str = "try",
        freeze_timeout: float = 20.0,
        events: EventSink | None = None,
    ) -> None:
        if fallback not in ("try", "require"):
            raise ValueError(f"unknown fallback policy {fallback}")
        self.writers = writers
        self.fallback = fallback
        self.freeze_timeout = freeze_timeout
        self._events = events or (lambda *_: None)
        self._failed: dict[str, str] = {}
        self._prepared: list[Writer] = []

    def _event(self, writer: Writer, phase: str, outcome: str, message: str = "") -> None:
        self._events(writer.name, phase, outcome, message)

    def _phase(self, writer: Writer, phase: str, fn: Callable[[], object]) -> bool:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - any writer failure is recorded and judged by policy
            self._failed[writer.name] = f"{phase}: {exc}"
            self._event(writer, phase, "failed", str(exc))
            return False
        message = ""
        if phase == "identify" and result:
            message = "; ".join(f"{c.kind} {c.name}: {', '.join(c.paths)}" for c in result)
        self._event(writer, phase, "ok", message)
        return True

    def _live(self) -> list[Writer]:
        return [w for w in self._prepared if w.name not in self._failed]

    def _check_policy(self) -> None:
        app_failed = [w for w in self.writers if w.level == "application" and w.name in self._failed]
        if app_failed and self.fallback == "require":
            reasons = "; ".join(f"{w.name} {self._failed[w.name]}" for w in app_failed)
            raise ConsistencyRequired(f"application-aware processing failed and the job requires it: {reasons}")

    def prepare(self) -> None:
        for writer in self.writers:
            if self._phase(writer, "identify", writer.identify) and self._phase(writer, "prepare", writer.prepare):
                self._prepared.append(writer)
            else:
                # it takes no further part, but may hold a session (psql started, a backup begun): end it now
                self._abort_one(writer)
        try:
            self._check_policy()
        except ConsistencyRequired:
            self.abort()
            raise

    def snapshot(self, take: Callable[[], T]) -> tuple[T, QuiesceOutcome]:
        """Freeze the live writers (applications first, filesystems last), take the snapshot, thaw."""
        order = sorted(self._live(), key=lambda w: w.level != "application")
        frozen: list[Writer] = []
        started = time.monotonic()
        thawed = threading.Event()
        timed_out = threading.Event()
        thaw_lock = threading.Lock()

        def thaw_all(reason: str) -> None:
            with thaw_lock:
                if thawed.is_set():
                    return
                thawed.set()
                for writer in reversed(frozen):
                    self._phase(writer, "thaw", writer.thaw)
                    if reason:
                        self._failed.setdefault(writer.name, reason)

        def watchdog() -> None:
            if not thawed.wait(self.freeze_timeout):
                timed_out.set()
                thaw_all(f"freeze: snapshot not taken within {self.freeze_timeout:.0f} s, thawed by timeout")

        # The watchdog starts before the first freeze: waiting for a lock counts as frozen time too.
        timer = threading.Thread(target=watchdog, name="freeze-watchdog", daemon=True)
        timer.start()
        try:
            for writer in order:
                if thawed.is_set():
                    break
                if self._phase(writer, "freeze", writer.freeze):
                    with thaw_lock:
                        frozen.append(writer)
                        late = thawed.is_set()
                    if late:  # the watchdog fired while this writer was freezing
                        self._phase(writer, "thaw", writer.thaw)
                        self._failed.setdefault(writer.name, "freeze: finished after the freeze timeout")
            # After a timeout the snapshot is still taken, at the level the failures leave (policy decides).
            result = take()
        finally:
            thaw_all("")
        freeze_seconds = time.monotonic() - started
        for writer in frozen:
            if timed_out.is_set():
                self._event(writer, "freeze", "failed", f"freeze window over {self.freeze_timeout:.0f} s")
        metadata: dict[str, dict] = {}
        for writer in self._live():
            if writer in frozen or writer.level == "application":

                def collect(w: Writer = writer) -> None:
                    metadata[w.name] = w.post_snapshot()

                self._phase(writer, "post-snapshot", collect)
        level = self._level(frozen)
        outcome = QuiesceOutcome(level, [f"{k} {v}" for k, v in self._failed.items()], freeze_seconds, metadata)
        try:
            self._check_policy()
        except ConsistencyRequired:
            self.abort()
            raise
        return result, outcome

    def _level(self, frozen: list[Writer]) -> str:
        good = [w for w in frozen if w.name not in self._failed]
        apps = [w for w in self.writers if w.level == "application"]
        fs = [w for w in good if w.level == "filesystem"]
        if apps and all(w in good for w in apps):
            return "application"
        return "filesystem" if fs else "crash"

    def complete(self, restore_point_id: str) -> None:
        for writer in self._live():
            self._phase(writer, "backup-complete", lambda w=writer: w.backup_complete(restore_point_id))

    def abort(self) -> None:
        for writer in self._prepared:
            self._phase(writer, "abort", writer.abort)

    def _abort_one(self, writer: Writer) -> None:
        """Abort a writer that already failed, keeping the first failure as the reason."""
        try:
            writer.abort()
        except Exception as exc:  # noqa: BLE001 - recorded; the earlier failure is what the job reports
            self._event(writer, "abort", "failed", str(exc))
        else:
            self._event(writer, "abort", "ok", "")
