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
from surepoint.errors import InUse, NotAVmBackup, SurepointError, UsageError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake
from surepoint.jobs.vm_backup import VmJobOptions
from surepoint.jobs.vm_fleet import backup_vms
from surepoint.jobs.vm_restore import VmRestoreOptions, restore_disks_into, restore_vm
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
    index: Annotated[
        bool, typer.Option("--index", help="Then record the restore points' file lists for `surepoint find`.")
    ] = False,
    fstrim: Annotated[
        bool, typer.Option("--fstrim", help="Ask the guest to trim its filesystems first (disks with discard=unmap).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Back up running QEMU VMs (found by name from their QEMU processes or --inventory), several in parallel.

    Each VM's disks are captured at one instant, quiesced through the guest agent, and read
    incrementally through QEMU dirty bitmaps. Exit 1 when any VM failed.
    """
    backup_and_report(
        ctx.obj, names, parallel, inventory, fallback, quiesce, full, as_json, freeze_timeout, skip_free, index, fstrim
    )


# An interrupted VM backup (the VM jobs record their events): the restore point is committed last.
VM_BACKUP_STAKE = (
    "no restore point was written for a VM whose backup had not finished (its guest is thawed and its "
    "backup view removed); chunks already stored are reused by the next backup"
)


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
    index: bool = False,
    fstrim: bool = False,
) -> None:
    """`vm backup` (and its older spelling `backup vm`): back up, print a table or JSON, exit 1 on failures."""
    if not names:
        raise UsageError("name at least one VM: surepoint vm backup NAME...")
    if fallback not in ("try", "require"):
        raise UsageError("--fallback must be try or require")
    repo = c.open_repository()
    options = VmJobOptions(
        fallback=fallback,
        quiesce=quiesce,
        full=full,
        freeze_timeout=freeze_timeout,
        skip_free=skip_free,
        fstrim=fstrim,
    )
    with at_stake(VM_BACKUP_STAKE):
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
    if index:
        _index_new_points(c, repo, [r["restore_point"] for r in results if r.get("restore_point")], as_json)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        say_error(f"backup of VM {o.vm} failed: {o.error}")
    if failed:
        raise typer.Exit(1)


def _index_new_points(c: Context, repo, point_ids: list[str], quiet: bool) -> None:
    """The file index of the new restore points; a failure is reported, the backups stand."""
    from surepoint.jobs.file_index import index_point

    for point_id in point_ids:
        try:
            result = index_point(repo, c.catalog(), repo.resolve(point_id), log=(lambda m: None) if quiet else log_line)
        except SurepointError as exc:
            say_error(f"file index of {point_id} not made: {exc}")
            continue
        if not quiet:
            log_line(f"file index of {point_id}: {len(result.volumes)} filesystem(s) in {result.seconds:.1f} s")


@vm_app.command("restore")
@with_hints(
    {
        NotAVmBackup: "`surepoint restore` restores the disks of a file backup",
        InUse: "choose another --storage directory or --name, or stop the VM",
    }
)
def vm_restore(
    ctx: typer.Context,
    restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest of a VM restore point.")],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Work directory: start script, sockets, pidfile, logs (and the disks, by default)."),
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Directory for the restored disk images (default: --to).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Name of the restored VM (default NAME-restored; a libvirt domain that is gone keeps its name)."
        ),
    ] = None,
    disk_format: Annotated[str, typer.Option("--format", help="qcow2 or raw.")] = "qcow2",
    start: Annotated[bool, typer.Option("--start", help="Boot it and wait for the guest agent.")] = False,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 300,
    kind: Annotated[
        str | None,
        typer.Option("--as", help="libvirt (define a domain) or qemu (a start script); default: as backed up."),
    ] = None,
    network: Annotated[
        str, typer.Option(help="Plain QEMU: keep, none, user, tap:NAME or bridge:NAME for the VM's NICs.")
    ] = "keep",
    new_macs: Annotated[
        bool | None,
        typer.Option(
            "--new-macs/--keep-macs",
            help="New MACs (and UUID) for the copy; default: new only when the original still exists.",
        ),
    ] = None,
    disks: Annotated[
        list[str] | None,
        typer.Option(
            "--disk",
            help="Only this disk (vda, a disk name or number), written over the disk of the existing, stopped VM.",
        ),
    ] = None,
    into: Annotated[
        str | None, typer.Option("--into", help="With --disk: the VM to restore into (default: the backed-up VM).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Recreate a VM from a restore point, or put single disks back into an existing VM.

    A libvirt domain is defined again from its saved XML (powered off unless --start); a plain
    QEMU VM gets a start script with its saved command line rewritten for the restored disks.
    See docs/vm-restore.md.
    """
    c: Context = ctx.obj
    if kind not in (None, "libvirt", "qemu"):
        raise UsageError("--as must be libvirt or qemu")
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    recorder = EventRecorder(c.catalog(), repo.id)
    if disks:
        if start or to or storage or name:
            raise UsageError("--disk restores into an existing VM: --to, --storage, --name and --start do not apply")
        done = restore_disks_into(repo, point, disks, into, log=log_line)
        recorder.record(
            Component.RESTORE,
            Phase.VM,
            Outcome.OK,
            "disks restored into the VM: " + ", ".join(f"{d.device} -> {d.path}" for d in done),
            restore_point=point.id,
        )
        if as_json:
            print_json({"restore_point": point.id, "disks": [d.__dict__ for d in done]})
            return
        for d in done:
            out.print(f"restored disk {d.device} of {point.id} over {d.path} ({d.format})")
        return
    if not to and not storage:
        raise UsageError("give --to DIR (or --storage DIR for a libvirt domain)")
    if into:
        raise UsageError("--into goes with --disk")
    options = VmRestoreOptions(
        workdir=to,
        storage=storage,
        name=name,
        disk_format=disk_format,
        start=start,
        boot_timeout=boot_timeout,
        as_libvirt=None if kind is None else kind == "libvirt",
        network=network,
        new_macs=new_macs,
    )
    result = restore_vm(repo, point, options, log=log_line)
    recorder.record(
        Component.RESTORE,
        Phase.VM,
        Outcome.OK,
        f"VM restored as {result.name} ({result.kind}) into {result.storage}",
        restore_point=point.id,
    )
    if as_json:
        print_json(result.to_json())
        return
    out.print(f"restored VM {point.name} from {point.id} as {result.name}: {', '.join(result.disks)}")
    if result.kind == "libvirt":
        out.print(f"libvirt domain {result.name} defined (UUID {result.domain_uuid})")
        if not start:
            out.print(f"start it with: virsh -c {result.libvirt_uri} start {result.name}")
    else:
        out.print(f"start it with: {result.start_script}")
    if start:
        booted = f"pid {result.pid}" if result.pid else "started"
        waited = f"; up after {result.boot_seconds:.1f} s" if result.boot_seconds is not None else ""
        out.print(f"booted ({booted}){waited}")


def register(app: typer.Typer) -> None:
    app.add_typer(vm_app, name="vm")
