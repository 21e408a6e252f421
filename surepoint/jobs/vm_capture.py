"""One instant of a running VM, shared by backups and replication: quiesce the guest (application
writers, then the guest agent's fsfreeze), take the point-in-time view of every disk with its
dirty-bitmap actions in one QMP transaction, thaw; read; then tear down and tell the writers.

Each consumer names its own bitmaps (backups per repository, replication per target), so chains
never touch each other: `usable_bitmap` checks a chain's last bitmap, `remove_stale_bitmaps` drops
what a chain's failed runs left, both only within one prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.consistency.guest_fsfreeze import GuestFsFreezeWriter
from surepoint.consistency.guest_runner import SESSION_LEASE, GuestRunner
from surepoint.consistency.quiesce import ConsistencyRequired, QuiesceOutcome, Quiescer
from surepoint.consistency.registry import build_writers
from surepoint.consistency.writer import Writer
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.vm.errors import GuestAgentError, QmpError, VmError
from surepoint.vm.fleece import PointInTimeView, remove_dead_views
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.info import VmInfo
from surepoint.vm.libvirt_domain import open_guest_agent
from surepoint.vm.qmp import BlockDevice, QmpConnection


@dataclass
class CaptureOptions:
    fallback: str = "try"  # try | require (application/filesystem consistency)
    quiesce: bool = True
    freeze_timeout: float = 20.0
    writers: list[dict] = field(default_factory=list)  # application writers run inside the guest


def disk_name(device: BlockDevice) -> str:
    """How a disk is named in views, restore points and replicas: its device, else its node."""
    return device.device or device.node_name


def bitmaps_of(qmp: QmpConnection, node: str) -> dict[str, dict]:
    """The named dirty bitmaps of a block node."""
    for entry in qmp.query_named_block_nodes():
        if entry.get("node-name") == node:
            # a running backup job's copy-before-write bitmap has no name
            return {b["name"]: b for b in entry.get("dirty-bitmaps", []) if b.get("name")}
    return {}


def usable_bitmap(qmp: QmpConnection, devices: list[BlockDevice], name: str, notes: list[str], fallback: str) -> bool:
    """Whether every disk has the bitmap `name`, consistent; if not, why goes to `notes` (ending in `fallback`,
    what the caller does instead)."""
    for dev in devices:
        bitmap = bitmaps_of(qmp, dev.node_name).get(name)
        if bitmap is None:
            notes.append(
                f"dirty bitmap {name} is missing on {disk_name(dev)} (VM restarted without it, or it was "
                f"deleted): {fallback}"
            )
            return False
        if bitmap.get("inconsistent") or bitmap.get("busy"):
            notes.append(
                f"dirty bitmap {name} on {disk_name(dev)} is not trustworthy (inconsistent or busy): {fallback}"
            )
            return False
    return True


def remove_stale_bitmaps(qmp: QmpConnection, devices: list[BlockDevice], prefix: str, keep: set[str]) -> None:
    """A chain's bitmaps left by failed or forgotten runs only cost the VM write tracking: drop them."""
    for dev in devices:
        for name in bitmaps_of(qmp, dev.node_name):
            if name.startswith(prefix) and name not in keep:
                with contextlib.suppress(QmpError):
                    qmp.execute("block-dirty-bitmap-remove", node=dev.node_name, name=name)


def clean_dead_views(qmp: QmpConnection, event: EventRecorder) -> None:
    """First thing of a job: a dead job's backup filter would show as the top node of every disk."""
    leftovers = remove_dead_views(qmp)
    if leftovers:
        event(
            Component.JOB,
            Phase.CLEANUP,
            Outcome.WARNING,
            "removed a dead job's point-in-time view: " + ", ".join(leftovers),
        )


class VmCapture:
    """The quiesced instant of one VM. Use: `open()`, `take(...)` -> view; read it; then `finish()`
    when the result is committed, or `abort()` when not; `complete(id)` tells the writers; `close()`.
    """

    def __init__(self, vm: VmInfo, options: CaptureOptions, event: EventRecorder) -> None:
        self.vm = vm
        self.options = options
        self.event = event
        self.agent: GuestAgent | None = None
        self.writers: list[Writer] = []
        self.app_writers: list[Writer] = []
        self.not_quiesced = ""
        self.quiescer: Quiescer | None = None
        self.view: PointInTimeView | None = None
        self.outcome: QuiesceOutcome | None = None

    def open(self) -> None:
        """Reach the guest agent and build the writers (ConsistencyRequired if `require` cannot be met)."""
        vm, options = self.vm, self.options
        if not options.quiesce:
            return
        why = "the VM has no guest-agent channel"
        if vm.guest_agent:
            try:
                self.agent = open_guest_agent(vm, timeout=10)
            except GuestAgentError as exc:
                why = f"guest agent unavailable: {exc}"
                self.event("guest-fsfreeze", Phase.IDENTIFY, Outcome.FAILED, why)
        if self.agent is not None:
            self._thaw_left_frozen()
            # a session may wait out the others' prepare and the freeze window before its next request
            lease = max(SESSION_LEASE, 4 * options.freeze_timeout)
            self.app_writers = build_writers(options.writers, GuestRunner(self.agent, vm.name, session_lease=lease))
            self.writers.extend(self.app_writers)
            self.writers.append(GuestFsFreezeWriter(self.agent, {"timeout": options.freeze_timeout}))
        elif options.fallback == "require":
            raise ConsistencyRequired(
                f"VM {vm.name}: cannot freeze the guest's filesystems ({why}) and --fallback require "
                "forbids a crash-consistent copy"
            )
        else:  # reported like a failed freeze: the job asked for a quiesced copy and got less
            self.not_quiesced = f"guest-fsfreeze identify: guest filesystems not frozen ({why}): crash-consistent only"

    def _thaw_left_frozen(self) -> None:
        """A job killed while the guest was frozen left it so (qemu-guest-agent has no time limit):
        its writes hang until a thaw. Thaw it first, or this freeze would fail too."""
        assert self.agent is not None
        try:
            if self.agent.fsfreeze_status(timeout=10) != "frozen":
                return
            self.agent.fsfreeze_thaw(timeout=30)
        except GuestAgentError as exc:
            self.event("guest-fsfreeze", Phase.CLEANUP, Outcome.WARNING, f"could not check or thaw the guest: {exc}")
            return
        self.event(
            "guest-fsfreeze",
            Phase.CLEANUP,
            Outcome.WARNING,
            "the guest's filesystems were left frozen (by a job that died while they were): thawed",
        )

    def take(
        self,
        qmp: QmpConnection,
        devices: list[BlockDevice],
        *,
        bitmap_name: str | None,
        new_bitmap: str | None,
        retire_base_bitmap: bool,
    ) -> PointInTimeView:
        """Prepare the writers, freeze, make the view (one transaction), thaw. On error everything is undone."""
        options = self.options
        self.quiescer = Quiescer(
            self.writers, fallback=options.fallback, freeze_timeout=options.freeze_timeout, events=self.event
        )
        self.quiescer.prepare()
        view = self.view = PointInTimeView(
            qmp,
            [disk_name(d) for d in devices],
            bitmap_name=bitmap_name,
            new_bitmap=new_bitmap,
            retire_base_bitmap=retire_base_bitmap,
        )

        def take() -> None:
            # The quiescer only enforces "require" for application writers; the guest freeze is
            # this job's whole consistency, so a failed freeze fails the job before any view exists.
            unfrozen = [w for w in self.writers if isinstance(w, GuestFsFreezeWriter) and not w.frozen]
            if options.fallback == "require" and unfrozen:
                reason = "; ".join(w.error or "the guest agent did not answer" for w in unfrozen)
                raise ConsistencyRequired(
                    f"VM {self.vm.name}: could not freeze the guest's filesystems ({reason}) and --fallback require "
                    "forbids a crash-consistent copy"
                )
            view.start()

        try:
            _, outcome = self.quiescer.snapshot(take)
        except BaseException:
            self.abort()
            raise
        if self.not_quiesced:
            outcome.failures.insert(0, self.not_quiesced)
        self.outcome = outcome
        self.event(
            "job",
            "snapshot",
            "ok",
            f"point-in-time view of {len(devices)} disk(s), "
            f"{outcome.level}-consistent, frozen {outcome.freeze_seconds:.3f} s",
        )
        return view

    def abort(self) -> None:
        """The copy failed: the view goes (with its new bitmap), the writers hear of it."""
        if self.view is not None:
            self.view.close(success=False)
        if self.quiescer is not None:
            self.quiescer.abort()

    def finish(self) -> None:
        """The copy is committed: the view goes, the new bitmap stays (and the old one, if asked, retires)."""
        if self.view is None:
            return
        try:
            self.view.close(success=True)
        except VmError as exc:  # the copy is committed; a leftover node is only untidy
            self.event(Component.JOB, Phase.CLEANUP, Outcome.WARNING, str(exc))

    def complete(self, point_id: str) -> None:
        if self.quiescer is not None:
            self.quiescer.complete(point_id)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None


Log = Callable[[str], None]
