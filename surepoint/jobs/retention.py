"""Forget restore points by a retention policy: the plan (a pure function) and carrying it out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake, checkpoint
from surepoint.repo.locks import held_points, repository_lock
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import MANIFEST_PREFIX, Repository
from surepoint.repo.retention import Candidate, Policy, apply_policy
from surepoint.timestamps import format_utc, parse_utc


@dataclass(frozen=True)
class Decision:
    """Keep or forget one restore point, and the rules that keep it."""

    id: str
    name: str
    created: str
    keep: bool
    reasons: list[str] = field(default_factory=list)
    locked_until: str | None = None  # under Object Lock: kept until then, a later forget removes it
    held_by: str | None = None  # a reader (restore, mount, instant, lab, copy) holds it: kept this time

    def to_json(self) -> dict:
        data = {"id": self.id, "name": self.name, "created": self.created, "keep": self.keep, "reasons": self.reasons}
        if self.locked_until:
            data["locked_until"] = self.locked_until
        if self.held_by:
            data["held_by"] = self.held_by
        return data


def plan_retention(points: Sequence[RestorePoint], policy: Policy) -> list[Decision]:
    """What `policy` keeps of `points`, each name judged on its own; names in order, then the
    points of each name in the order given."""
    decisions: list[Decision] = []
    for group in sorted({p.name for p in points}):
        members = [p for p in points if p.name == group]
        kept = apply_policy([Candidate(p.id, parse_utc(p.created)) for p in members], policy)
        for p in members:
            decisions.append(Decision(p.id, p.name, p.created, p.id in kept, kept.get(p.id, [])))
    return decisions


@dataclass
class ForgetResult:
    dry_run: bool
    decisions: list[Decision]

    @property
    def forgotten(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def held(self) -> list[Decision]:
        """Points the policy would forget that a reader holds: refused this time, naming the reader."""
        return [d for d in self.decisions if d.held_by]

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "decisions": [d.to_json() for d in self.decisions]}


def forget_by_policy(
    repository: Repository,
    events: EventRecorder,
    policy: Policy,
    *,
    name: str | None = None,
    dry_run: bool = False,
) -> ForgetResult:
    """Forget the restore points (of `name`, or of every name) that `policy` does not keep.

    The data stays until the next garbage collection. An empty policy keeps everything.
    """
    points = [p for p in repository.list_restore_points() if name is None or p.name == name]
    decisions = plan_retention(points, policy)
    forget = {d.id for d in decisions if not d.keep}
    locked_until = getattr(repository.backend, "locked_until", None)
    done: list[str] = []

    def state() -> str:
        return (
            f"{len(done)} of {len(forget)} restore point(s) forgotten before the interruption (their data goes "
            "at the next gc); the others are kept"
        )

    def record(message: str) -> None:
        events.record(Component.RETENTION, Phase.FORGET, Outcome.FAILED, message)

    if not dry_run and forget:
        with at_stake(state, record), repository_lock(repository.backend, "forget"):
            # Readers that started before this lock was written are seen here; one starting later
            # sees this lock and waits (repo/locks.py): a point being read is never forgotten.
            held = held_points(repository.backend)
            for p in points:
                if p.id in forget and p.id in held:
                    i = next(i for i, d in enumerate(decisions) if d.id == p.id)
                    decisions[i] = replace(decisions[i], held_by=held[p.id].describe())
                    events.record(
                        Component.RETENTION,
                        Phase.FORGET,
                        Outcome.SKIPPED,
                        f"not forgotten: being read ({held[p.id].describe()})",
                        restore_point=p.id,
                    )
                    continue
                if p.id in forget:
                    # An object under retention cannot go before its date: say when instead of trying.
                    until = locked_until(f"{MANIFEST_PREFIX}{p.id}") if locked_until else None
                    if until:
                        when = format_utc(datetime.fromtimestamp(until, UTC))
                        i = next(i for i, d in enumerate(decisions) if d.id == p.id)
                        decisions[i] = replace(decisions[i], locked_until=when)
                        continue
                    repository.delete_restore_point(p)
                    done.append(p.id)
                    events.record(
                        Component.RETENTION, Phase.FORGET, Outcome.OK, "forgotten by policy", restore_point=p.id
                    )
                    checkpoint("forget-point")
    return ForgetResult(dry_run, decisions)
