"""`surepoint vm`: list the VMs that can be backed up, back them up, restore one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import (
    Context,
    InventoryOption,
    JsonOption,
    SkipFreeOption,
    human,
    log_line,
    out,
    print_json,
    say_error,
    with_hints,
)
from surepoint.errors import NotAVmBackup, UsageError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.jobs.vm_backup import VmJobOptions
from surepoint.jobs.vm_fleet import backup_vms
from surepoint.jobs.vm_restore import restore_vm
from surepoint.vm.inventory import load_inventory, running_vms

vm_app = typer.Typer(help="Virtual machines: find them, back them up, restore them.", no_args_is_help=True)


@vm_app.command("list")
def vm_list(inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """VMs that can be backed up: running QEMU processes with a QMP socket, and the inventory file."""
    vms = (load_inventory(inventory) if inventory else []) + running_vms()
    if as_json:
        print_json([{"name": v.name, "qmp": v.qmp, "guest_agent": v.guest_agent, "pid": v.pid} for v in vms])
        return
    table = Table(title="virtual machines")
    for col in ("name", "pid", "QMP socket", "guest agent socket"):
        table.add_column(col)
    for v in vms:
        table.add_row(v.name, str(v.pid or ""), v.qmp, v.guest_agent or "(none)")
    out.print(table)


@vm_app.command("backup")
def vm_backup(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Names of running VMs (QEMU -name, libvirt domain, inventory).")],
    full: Annotated[bool, typer.Option("--full", help="Read every disk in full, not only what changed.")] = False,
    parallel: Annotated[int, typer.Option(help="VMs backed up at once.", min=1)] = 2,
    inventory: InventoryOption = None,
    fallback: Annotated[str, typer.Option(help="try: fall back to crash consistency; require: fail.")] = "try",
    quiesce: Annotated[bool, typer.Option(help="Freeze guest filesystems through the guest agent.")] = True,
    freeze_timeout: Annotated[float, typer.Option(help="Seconds the guest may stay frozen.", min=1)] = 20.0,
    skip_free: SkipFreeOption = True,
    as_json: JsonOption = False,
) -> None:
    """Back up running QEMU VMs (found by name from their QEMU processes or --inventory), several in parallel.

    Each VM's disks are captured at one instant, quiesced through the guest agent, and read
    incrementally through QEMU dirty bitmaps. Exit 1 when any VM failed.
    """
    backup_and_report(ctx.obj, names, parallel, inventory, fallback, quiesce, full, as_json, freeze_timeout, skip_free)


def backup_and_report(
    c: Context,
    names: list[str],
    parallel: int,
    inventory: str | None,
    fallback: str,
    quiesce: bool,
    full: bool,
    as_json: bool,
    freeze_timeout: float = 20.0,
    skip_free: bool = True,
) -> None:
    """`vm backup` (and its older spelling `backup vm`): back up, print a table or JSON, exit 1 on failures."""
    if not names:
        raise UsageError("name at least one VM: surepoint vm backup NAME...")
    if fallback not in ("try", "require"):
        raise UsageError("--fallback must be try or require")
    repo = c.open_repository()
    options = VmJobOptions(
        fallback=fallback, quiesce=quiesce, full=full, freeze_timeout=freeze_timeout, skip_free=skip_free
    )
    outcomes = backup_vms(repo, c.catalog(), names, options, parallel=parallel, inventory=inventory, log=log_line)
    results = [o.to_json() for o in outcomes]
    if as_json:
        print_json({"vms": results})
    else:
        table = Table(title="VM backup")
        for col in ("vm", "status", "restore point", "consistency", "read", "stored", "notes"):
            table.add_column(col)
        for r in results:
            table.add_row(
                r["vm"],
                r["status"],
                r.get("restore_point", ""),
                r.get("consistency", ""),
                human(r["read_bytes"]) if "read_bytes" in r else "",
                human(r["stored_bytes"]) if "stored_bytes" in r else "",
                r.get("error") or "; ".join([r.get("cbt", "")] + r.get("notes", [])),
            )
        out.print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        say_error(f"backup of VM {o.vm} failed: {o.error}")
    if failed:
        raise typer.Exit(1)


@vm_app.command("restore")
@with_hints({NotAVmBackup: "`surepoint restore` restores the disks of a file backup"})
def vm_restore(
    ctx: typer.Context,
    restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest of a VM restore point.")],
    to: Annotated[str, typer.Option("--to", help="Directory for the VM's disks and its start script.")],
    disk_format: Annotated[str, typer.Option("--format", help="qcow2 or raw.")] = "qcow2",
    start: Annotated[bool, typer.Option("--start", help="Boot it and wait for the guest agent.")] = False,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 300,
    as_json: JsonOption = False,
) -> None:
    """Recreate a VM from a restore point: its disks and its QEMU command line; optionally boot it."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    result = restore_vm(
        repo,
        point,
        to,
        disk_format=disk_format,
        start=start,
        boot_timeout=boot_timeout,
        log=log_line,
    )
    EventRecorder(c.catalog(), repo.id).record(
        Component.RESTORE, Phase.VM, Outcome.OK, f"VM restored to {to}", restore_point=point.id
    )
    if as_json:
        print_json(result)
        return
    out.print(f"restored VM {point.name} from {point.id} into {to}: {', '.join(result['disks'])}")
    out.print(f"start it with: {result['start_script']}")
    if start:
        out.print(f"booted (pid {result['pid']}); guest agent answered after {result['boot_seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.add_typer(vm_app, name="vm")
