"""Back up a running QEMU VM: quiesce through the guest agent, point-in-time view, dirty-bitmap CBT.

Every disk of the VM is captured at one instant (one QMP transaction) and read over NBD while
the guest keeps running. Each restore point leaves a persistent dirty bitmap named after it on
every disk; the next backup reads only what that bitmap marks, and falls back to a full read
(compared chunk by chunk with the previous index) when the bitmap is missing or inconsistent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from surepoint.catalog import Catalog
from surepoint.consistency.logs import handle_logs
from surepoint.consistency.quiesce import QuiesceOutcome
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.fsmap.source import free_space_summary, skip_free_space
from surepoint.fsmap.trim import trim_guest
from surepoint.jobs.vm_capture import (
    CaptureOptions,
    VmCapture,
    clean_dead_views,
    disk_name,
    remove_stale_bitmaps,
    usable_bitmap,
)
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.vm.errors import QmpError
from surepoint.vm.inventory import VmInfo
from surepoint.vm.libvirt_domain import domain_metadata, open_qmp
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
    fstrim: bool = False  # ask the guest to trim first (disks with discard=unmap only)


@dataclass
class VmJobResult:
    vm: str
    restore_point: RestorePoint
    outcome: QuiesceOutcome
    cbt: str
    notes: list[str] = field(default_factory=list)


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
    if base_disks != [(disk_name(d), d.size) for d in devices]:
        notes.append("the VM's disks changed since the last backup: reading every disk in full")
        return None
    return name if usable_bitmap(qmp, devices, name, notes, "reading every disk in full") else None


def bitmap_prefix(repository: Repository) -> str:
    """Bitmaps are named per repository, so two repositories backing up one VM keep their own."""
    return f"{BITMAP_PREFIX}{repository.id[:12]}-"


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
    capture = VmCapture(
        vm,
        CaptureOptions(options.fallback, options.quiesce, options.freeze_timeout, options.writers),
        event,
    )
    try:
        with open_qmp(vm) as qmp:  # a libvirt domain: QMP through libvirtd
            clean_dead_views(qmp, event)
            devices = qmp.block_devices()
            if not devices:
                raise QmpError(f"VM {vm.name} has no disks")
            base = None if options.full else repository.latest_named(vm.name)
            base_bitmap = _usable_base_bitmap(qmp, devices, base, notes)
            for note in notes:
                event(Component.CBT, Phase.PLAN, Outcome.WARNING, note)
            new_bitmap = bitmap_prefix(repository) + rp_id
            remove_stale_bitmaps(qmp, devices, bitmap_prefix(repository), {base_bitmap} if base_bitmap else set())

            capture.open()
            if options.fstrim:
                trimmed, message = trim_guest(capture.agent, vm.command_line, vm.domain_xml)
                event(Component.JOB, Phase.PREPARE, Outcome.OK if trimmed else Outcome.WARNING, message)
            view = capture.take(qmp, devices, bitmap_name=base_bitmap, new_bitmap=new_bitmap, retire_base_bitmap=True)
            outcome = capture.outcome
            assert outcome is not None
            try:
                sources = [view.source(disk_name(d)) for d in devices]
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
                capture.abort()
                raise
            capture.finish()
            event(
                Component.JOB,
                Phase.COMMIT,
                Outcome.OK,
                f"restore point {point.id} committed ({point.consistency}-consistent)",
            )
            capture.complete(point.id)
            if capture.app_writers:
                handle_logs(
                    options.logs,
                    list(zip(options.writers, capture.app_writers, strict=True)),
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
        capture.close()
    read = sum(d.read_bytes for d in point.disks)
    event(
        Component.JOB,
        Phase.FINISH,
        Outcome.OK if not outcome.failures else Outcome.WARNING,
        f"restore point {point.id}: {outcome.level}-consistent, {cbt}, read {read} bytes",
    )
    return VmJobResult(vm.name, point, outcome, cbt, notes)
