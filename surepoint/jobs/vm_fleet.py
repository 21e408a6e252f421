"""Back up many VMs, several at a time; one VM failing does not stop the others."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from surepoint.catalog import Catalog
from surepoint.errors import SurepointError
from surepoint.events import EventRecorder
from surepoint.interrupt import stop_point
from surepoint.jobs.progress import Log, no_log
from surepoint.jobs.vm_backup import VmJobOptions, VmJobResult, backup_vm
from surepoint.repo.repository import Repository
from surepoint.vm.inventory import find_vm


@dataclass
class VmBackupOutcome:
    """How the backup of one VM of a run went: `result` when it committed, `error` when not."""

    vm: str
    result: VmJobResult | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.result is None:
            return "failed"
        return "warning" if self.result.outcome.failures else "ok"

    def to_json(self) -> dict:
        if self.result is None:
            return {"vm": self.vm, "status": "failed", "error": self.error}
        point = self.result.restore_point
        return {
            "vm": self.vm,
            "status": self.status,
            "restore_point": point.id,
            "consistency": point.consistency,
            "cbt": self.result.cbt,
            "read_bytes": sum(d.read_bytes for d in point.disks),
            "stored_bytes": sum(d.stored_bytes for d in point.disks),
            "size": point.size,
            "duration_seconds": point.duration_seconds,
            "notes": self.result.notes + self.result.outcome.failures,
        }


def backup_vms(
    repository: Repository,
    catalog: Catalog,
    names: list[str],
    options: VmJobOptions,
    *,
    parallel: int = 2,
    inventory: str | None = None,
    events: EventRecorder | None = None,
    log: Log = no_log,
) -> list[VmBackupOutcome]:
    """Back up the VMs `names` (found in `inventory` or among running QEMU processes), at most
    `parallel` at once; the outcomes in the order of `names`."""

    def one(name: str) -> VmBackupOutcome:
        stop_point()  # interrupted meanwhile: a VM not started yet is not started
        try:
            vm = find_vm(name, inventory)
            result = backup_vm(repository, catalog, vm, options, events=events, log=log)
        except SurepointError as exc:
            return VmBackupOutcome(name, error=str(exc))
        return VmBackupOutcome(name, result=result)

    pool = ThreadPoolExecutor(max(1, min(parallel, len(names))))
    try:
        return list(pool.map(one, names))
    finally:
        # Interrupted: VMs not started are dropped; running ones stop at their next chunk (stop_point),
        # thaw their guest and remove their backup view on the way out.
        pool.shutdown(wait=True, cancel_futures=True)
