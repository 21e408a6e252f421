"""Back up a running QEMU VM: quiesce through the guest agent, point-in-time view, dirty-bitmap CBT.

Every disk of the VM is captured at one instant (one QMP transaction) and read over NBD while
the guest keeps running. Each restore point leaves a persistent dirty bitmap named after it on
every disk; the next backup reads only what that bitmap marks, and falls back to a full read
(compared chunk by chunk with the previous index) when the bitmap is missing or inconsistent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from surepoint.catalog import Catalog
from surepoint.consistency.guest_fsfreeze import GuestFsFreezeWriter
from surepoint.consistency.guest_runner import SESSION_LEASE, GuestRunner
from surepoint.consistency.logs import handle_logs
from surepoint.consistency.quiesce import ConsistencyRequired, QuiesceOutcome, Quiescer
from surepoint.consistency.registry import build_writers
from surepoint.consistency.writer import Writer
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.fsmap.source import free_space_summary, skip_free_space
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.vm.errors import GuestAgentError, QmpError, VmError
from surepoint.vm.fleece import PointInTimeView, remove_dead_views
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.inventory import VmInfo
from surepoint.vm.libvirt_domain import domain_metadata, open_guest_agent, open_qmp
from surepoint.vm.qmp import BlockDevice, QmpConnection

BITMAP_PREFIX = "surepoint-"


@dataclass
class VmJobOptions:
    fallback: str = "try"  # try | require (application/filesystem consistency)
    quiesce: bool = True
    freeze_timeout: float = 20.0
    full: bool = False
    writers: list[dict] = field(default_factory=list)  # application writers run inside the guest
    logs: str = "truncate"  # transaction-log mode for those writers
    skip_free: bool = True  # free blocks of the guest's filesystems stored as zeros, not read


@dataclass
class VmJobResult:
    vm: str
    restore_point: RestorePoint
    outcome: QuiesceOutcome
    cbt: str
    notes: list[str] = field(default_factory=list)


def _bitmaps(qmp: QmpConnection, node: str) -> dict[str, dict]:
    for entry in qmp.query_named_block_nodes():
        if entry.get("node-name") == node:
            # a running backup job's copy-before-write bitmap has no name
            return {b["name"]: b for b in entry.get("dirty-bitmaps", []) if b.get("name")}
    return {}


def _usable_base_bitmap(
    qmp: QmpConnection, devices: list[BlockDevice], base: RestorePoint | None, notes: list[str]
) -> str | None:
    """The bitmap of the base restore point if every disk has it, consistent; else None (full read)."""
    if base is None:
        return None
    name = base.metadata.get("vm", {}).get("bitmap")
    if not name:
        notes.append(f"restore point {base.id} left no dirty bitmap: reading every disk in full")
        return None
    base_disks = [(d.name, d.size) for d in base.disks]
    if base_disks != [(d.device or d.node_name, d.size) for d in devices]:
        notes.append("the VM's disks changed since the last backup: reading every disk in full")
        return None
    for dev in devices:
        bitmap = _bitmaps(qmp, dev.node_name).get(name)
        if bitmap is None:
            notes.append(
                f"dirty bitmap {name} is missing on {dev.device or dev.node_name} (VM restarted "
                "without it, or it was deleted): reading every disk in full"
            )
            return None
        if bitmap.get("inconsistent") or bitmap.get("busy"):
            notes.append(
                f"dirty bitmap {name} on {dev.device or dev.node_name} is not trustworthy "
                "(inconsistent or busy): reading every disk in full"
            )
            return None
    return name


def bitmap_prefix(repository: Repository) -> str:
    """Bitmaps are named per repository, so two repositories backing up one VM keep their own."""
    return f"{BITMAP_PREFIX}{repository.id[:12]}-"


def _remove_stale_bitmaps(qmp: QmpConnection, devices: list[BlockDevice], prefix: str, keep: set[str]) -> None:
    """This repository's bitmaps left by failed or forgotten jobs only cost the VM write tracking: drop them."""
    for dev in devices:
        for name in _bitmaps(qmp, dev.node_name):
            if name.startswith(prefix) and name not in keep:
                with contextlib.suppress(QmpError):
                    qmp.execute("block-dirty-bitmap-remove", node=dev.node_name, name=name)


def backup_vm(
    repository: Repository,
    catalog: Catalog,
    vm: VmInfo,
    options: VmJobOptions | None = None,
    *,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
    events: EventRecorder | None = None,
    log: Callable[[str], None] | None = None,
) -> VmJobResult:
    options = options or VmJobOptions()
    rp_id = repository.new_restore_point_id()
    say = log or (lambda _m: None)
    notes: list[str] = []
    event = replace(
        (events or EventRecorder(catalog, repository.id)).bound(restore_point=rp_id, source=vm.name),
        echo=lambda m: say(f"{vm.name}: {m}"),
    )

    event(Component.JOB, Phase.START, Outcome.OK, f"backup of VM {vm.name}")
    agent: GuestAgent | None = None
    try:
        with open_qmp(vm) as qmp:  # a libvirt domain: QMP through libvirtd
            # first: a dead job's backup filter would show as the top node of every disk
            leftovers = remove_dead_views(qmp)
            if leftovers:
                event(
                    Component.JOB,
                    Phase.CLEANUP,
                    Outcome.WARNING,
                    "removed a dead job's point-in-time view: " + ", ".join(leftovers),
                )
            devices = qmp.block_devices()
            if not devices:
                raise QmpError(f"VM {vm.name} has no disks")
            base = None if options.full else repository.latest_named(vm.name)
            base_bitmap = _usable_base_bitmap(qmp, devices, base, notes)
            for note in notes:
                event(Component.CBT, Phase.PLAN, Outcome.WARNING, note)
            new_bitmap = bitmap_prefix(repository) + rp_id
            _remove_stale_bitmaps(qmp, devices, bitmap_prefix(repository), {base_bitmap} if base_bitmap else set())

            writers: list[Writer] = []
            app_writers: list[Writer] = []
            not_quiesced = ""
            if options.quiesce:
                why = "the VM has no guest-agent channel"
                if vm.guest_agent:
                    try:
                        agent = open_guest_agent(vm, timeout=10)
                    except GuestAgentError as exc:
                        why = f"guest agent unavailable: {exc}"
                        event("guest-fsfreeze", Phase.IDENTIFY, Outcome.FAILED, why)
                if agent is not None:
                    # a session may wait out the others' prepare and the freeze window before its next request
                    lease = max(SESSION_LEASE, 4 * options.freeze_timeout)
                    app_writers = build_writers(options.writers, GuestRunner(agent, vm.name, session_lease=lease))
                    writers.extend(app_writers)
                    writers.append(GuestFsFreezeWriter(agent, {"timeout": options.freeze_timeout}))
                elif options.fallback == "require":
                    raise ConsistencyRequired(
                        f"VM {vm.name}: cannot freeze the guest's filesystems ({why}) and --fallback require "
                        "forbids a crash-consistent backup"
                    )
                else:  # reported like a failed freeze: the job asked for a quiesced backup and got less
                    not_quiesced = (
                        f"guest-fsfreeze identify: guest filesystems not frozen ({why}): crash-consistent only"
                    )
            quiescer = Quiescer(writers, fallback=options.fallback, freeze_timeout=options.freeze_timeout, events=event)
            quiescer.prepare()
            view = PointInTimeView(
                qmp,
                [d.device or d.node_name for d in devices],
                bitmap_name=base_bitmap,
                new_bitmap=new_bitmap,
                retire_base_bitmap=True,
            )

            def take() -> None:
                # The quiescer only enforces "require" for application writers; the guest freeze is
                # this job's whole consistency, so a failed freeze fails the job before any view exists.
                unfrozen = [w for w in writers if isinstance(w, GuestFsFreezeWriter) and not w.frozen]
                if options.fallback == "require" and unfrozen:
                    reason = "; ".join(w.error or "the guest agent did not answer" for w in unfrozen)
                    raise ConsistencyRequired(
                        f"VM {vm.name}: could not freeze the guest's filesystems ({reason}) and --fallback require "
                        "forbids a crash-consistent backup"
                    )
                view.start()

            try:
                _, outcome = quiescer.snapshot(take)
                if not_quiesced:
                    outcome.failures.insert(0, not_quiesced)
                event(
                    "job",
                    "snapshot",
                    "ok",
                    f"point-in-time view of {len(devices)} disk(s), "
                    f"{outcome.level}-consistent, frozen {outcome.freeze_seconds:.3f} s",
                )
                sources = [view.source(d.device or d.node_name) for d in devices]
                try:
                    free_space: dict[int, dict] = {}
                    if options.skip_free:
                        sources, free_space = skip_free_space(sources, log=lambda m: say(f"{vm.name}: {m}"))
                        event(Component.JOB, Phase.PLAN, Outcome.OK, free_space_summary(free_space))
                    cbt = "dirty bitmap" if base_bitmap else ("full read" if base is None else "full read, compared")
                    persistent = all(d.driver == "qcow2" for d in devices)
                    request = BackupRequest(
                        name=vm.name,
                        sources=sources,
                        source_info={"kind": "qemu-vm", "vm": vm.name, "qmp": vm.qmp},
                        consistency=outcome.level,
                        metadata={
                            "vm": {
                                "command_line": vm.command_line,
                                **domain_metadata(vm),  # a libvirt domain: its URI and XML
                                "disks": [asdict(d) for d in devices],
                                "bitmap": new_bitmap,
                                "bitmap_persistent": persistent,
                                "cbt": cbt,
                                "notes": notes,
                            },
                            "writers": outcome.writer_metadata,
                            "log_mode": options.logs,
                            "consistency_failures": outcome.failures,
                            "freeze_seconds": round(outcome.freeze_seconds, 3),
                        },
                        disk_metadata=free_space,
                        base=base,
                        restore_point_id=rp_id,
                    )
                    total = sum(s.size for s in sources)
                    progress = progress_factory(total) if progress_factory else None
                    point = run_backup(repository, request, progress=progress, log=lambda m: say(f"{vm.name}: {m}"))
                finally:
                    for source in sources:
                        source.close()
            except BaseException:
                view.close(success=False)
                quiescer.abort()
                raise
            try:
                view.close(success=True)
            except VmError as exc:  # the restore point is committed; a leftover node is only untidy
                event(Component.JOB, Phase.CLEANUP, Outcome.WARNING, str(exc))
            event(
                Component.JOB,
                Phase.COMMIT,
                Outcome.OK,
                f"restore point {point.id} committed ({point.consistency}-consistent)",
            )
            quiescer.complete(point.id)
            if app_writers:
                handle_logs(
                    options.logs,
                    list(zip(options.writers, app_writers, strict=True)),
                    outcome.writer_metadata,
                    catalog=catalog,
                    repository_id=repository.id,
                    restore_point_id=point.id,
                    source=vm.name,
                    events=event,
                )
    except BaseException as exc:
        event(Component.JOB, Phase.FINISH, Outcome.FAILED, str(exc) or type(exc).__name__)
        raise
    finally:
        if agent is not None:
            agent.close()
    read = sum(d.read_bytes for d in point.disks)
    event(
        Component.JOB,
        Phase.FINISH,
        Outcome.OK if not outcome.failures else Outcome.WARNING,
        f"restore point {point.id}: {outcome.level}-consistent, {cbt}, read {read} bytes",
    )
    return VmJobResult(vm.name, point, outcome, cbt, notes)
