"""Transaction-log handling after a committed backup: truncate, keep, copy-only or after-verify.

Pruning runs only after the restore point is committed (durable and listed); a job that fails
earlier never reaches this module, so every log stays where it was.
"""

from __future__ import annotations

from collections.abc import Callable

from surepoint.catalog import Catalog
from surepoint.consistency.registry import WRITERS
from surepoint.consistency.runner import CommandRunner
from surepoint.consistency.writer import Writer
from surepoint.errors import SurepointError
from surepoint.repo.manifest import RestorePoint

EventSink = Callable[[str, str, str, str], None]


def handle_logs(
    mode: str,
    writers: list[tuple[dict, Writer]],
    writer_metadata: dict[str, dict],
    *,
    catalog: Catalog,
    repository_id: str,
    restore_point_id: str,
    source: str,
    events: EventSink,
) -> None:
    """Apply the job's log mode to every writer that has logs and reached post-snapshot."""
    for config, writer in writers:
        if not writer.has_logs:
            continue
        metadata = writer_metadata.get(writer.name)
        if metadata is None:
            events(writer.name, "prune-logs", "skipped", "the writer did not complete: every log kept")
            continue
        if mode == "keep":
            events(writer.name, "prune-logs", "skipped", "log mode keep: nothing pruned")
        elif mode == "copy-only":
            events(writer.name, "prune-logs", "skipped", "copy-only backup: application backup history untouched")
        elif mode == "after-verify":
            catalog.add_pending_prune(repository_id, restore_point_id, source, config["type"], config, metadata)
            events(writer.name, "prune-logs", "pending", "logs will be pruned once the restore point is verified")
        else:
            prune_now(writer, metadata, events)


def prune_now(writer: Writer, metadata: dict, events: EventSink) -> bool:
    try:
        report = writer.prune_logs(metadata)
    except Exception as exc:  # noqa: BLE001 - a failed prune is an event, never a failed backup
        events(writer.name, "prune-logs", "failed", str(exc))
        return False
    listed = ", ".join(report.pruned[:20]) + (f" and {len(report.pruned) - 20} more" if len(report.pruned) > 20 else "")
    message = f"pruned {len(report.pruned)}: {listed}" if report.pruned else "nothing to prune"
    if report.kept_from:
        message += f"; kept from {report.kept_from}"
    events(writer.name, "prune-logs", "ok", message)
    return True


def run_pending_prunes(
    catalog: Catalog, repository_id: str, restore_point_id: str, runner: CommandRunner, events: EventSink
) -> int:
    """Prune the logs a verified restore point was waiting for; return how many writers pruned."""
    done = 0
    for pending in catalog.pending_prunes(repository_id, restore_point_id):
        done += _prune_pending(catalog, pending, runner, events)
    return done


def _prune_pending(catalog: Catalog, pending: dict, runner: CommandRunner, events: EventSink) -> int:
    config = pending["writer_config"]
    writer = WRITERS[pending["writer_type"]](runner, {k: v for k, v in config.items() if k != "type"})
    if prune_now(writer, pending["metadata"], events):
        catalog.mark_prune_done(pending["id"])
        return 1
    return 0


def prune_if_verified(
    catalog: Catalog,
    repository_id: str,
    point: RestorePoint,
    events: EventSink,
    *,
    inventory: str | None = None,
) -> int:
    """Log mode after-verify: prune what `point` waits for once it is verified, in full.

    Verified in full means its chunks passed an integrity check and, for a VM, a recovery lab
    booted it and its tests passed (catalog.verification_summary). A VM's logs are pruned inside
    that VM, through its guest agent; an image file's on this host.
    """
    pending = catalog.pending_prunes(repository_id, point.id)
    if not pending:
        return 0
    bootable = point.bootable
    summary = catalog.verification_summary(repository_id, point.id, bootable)
    if summary["state"] != "verified":
        waiting = [k for k in ("integrity", "recovery") if summary[k] != "verified" and (k == "integrity" or bootable)]
        for entry in pending:
            events(
                entry["writer_type"],
                "prune-logs",
                "pending",
                "logs kept: the restore point is not verified yet ("
                + ", ".join(f"{k} {summary[k]}" for k in waiting)
                + ")",
            )
        return 0
    if not point.metadata.get("vm"):
        from surepoint.consistency.runner import HostRunner

        return run_pending_prunes(catalog, repository_id, point.id, HostRunner(), events)
    from surepoint.consistency.guest_runner import GuestRunner
    from surepoint.vm.inventory import guest_agent_for

    done = 0
    by_vm: dict[str, list[dict]] = {}
    for entry in pending:
        by_vm.setdefault(entry["source"] or point.name, []).append(entry)
    for vm_name, entries in by_vm.items():
        try:
            agent = guest_agent_for(vm_name, inventory)
        except SurepointError as exc:
            for entry in entries:
                events(entry["writer_type"], "prune-logs", "failed", f"VM {vm_name}: {exc}; logs kept, will retry")
            continue
        with agent:
            runner = GuestRunner(agent, vm_name)
            for entry in entries:
                done += _prune_pending(catalog, entry, runner, events)
    return done
