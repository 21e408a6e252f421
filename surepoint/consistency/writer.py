"""The writer interface, modelled on the VSS writer phases.

identify -> prepare -> freeze -> [snapshot] -> thaw -> post_snapshot -> [backup, commit]
-> backup_complete(restore point) -> prune_logs (per the job's log mode); abort() on any failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surepoint.consistency.runner import CommandFailed, CommandRunner


@dataclass
class Component:
    """Something an application stores: data files, log files, with where they live."""

    name: str
    kind: str  # "data" | "log" | "config"
    paths: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    pruned: list[str] = field(default_factory=list)
    kept_from: str = ""  # the oldest log still needed


class Writer:
    """One application (or the filesystem) on one runner. Subclasses override the phases they need.

    `level` is the consistency this writer gives when it succeeds: "application" for databases,
    "filesystem" for a filesystem freeze. A writer keeps its own per-job state on `self`.
    """

    name = "writer"
    level = "application"
    has_logs = False

    def __init__(self, runner: CommandRunner, config: dict | None = None) -> None:
        self.runner = runner
        self.config = dict(config or {})
        self.metadata: dict = {}

    def secret(self, key: str) -> str | None:
        """A secret setting: `key` itself, or the first line of the file named by `<key>_file`.

        `password_file` keeps the password out of the job file and out of the catalog, which then
        only names the file (see surepoint.catalog)."""
        if self.config.get(key) is not None:
            return str(self.config[key])
        path = self.config.get(f"{key}_file")
        if not path:
            return None
        try:
            with open(path) as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise CommandFailed(f"{key}_file {path}: {exc.strerror or exc}") from None

    def identify(self) -> list[Component]:
        return []

    def prepare(self) -> None:
        """Get ready to freeze (connect, check credentials, start a backup session)."""

    def freeze(self) -> None:
        """Stop writes reaching disk; must be quick: the snapshot follows at once."""

    def thaw(self) -> None:
        """Let writes go on. Must be safe to call when freeze failed or already thawed."""

    def post_snapshot(self) -> dict:
        """Collect what a restore needs (log positions, labels); stored in the restore-point manifest."""
        return dict(self.metadata)

    def backup_complete(self, restore_point_id: str) -> None:
        """The restore point is committed (durable and listed)."""

    def prune_logs(self, metadata: dict) -> PruneReport:
        """Remove logs the committed backup no longer needs; only called after backup_complete."""
        return PruneReport()

    def abort(self) -> None:
        """The job failed: end sessions, keep every log."""
