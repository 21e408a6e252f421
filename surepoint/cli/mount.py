"""Commands that serve restore points straight from the repository (mount, file-level restore).

No `from __future__ import annotations` here: typer evaluates the annotations of the commands,
which use names imported inside register().
"""

import contextlib
import os
from typing import Annotated

import typer

from surepoint.cli.common import Context, JsonOption, err, out, parse_size, print_json, with_hints
from surepoint.errors import InUse, NeedsRoot, SurepointError, UsageError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.text import printable


def _mount_table(state) -> list[list[str]]:
    rows = [["disk", "", f"{d['number']}: {d['name']}", d["image"]] for d in state.disks]
    rows += [[f"disk{m['disk']}/{m['volume']}", m["fstype"], m["device"], m["path"]] for m in state.mounts]
    rows += [[f"disk{s['disk']}/{s['volume']}", "", "not mounted", s["reason"]] for s in state.skipped]
    return rows


def _volume_name(volume: dict) -> str:
    if volume.get("volume") == "guest":
        where = [f"{printable(m['mountpoint'])} on disk {m['disk']} {m['volume']}" for m in volume.get("mounts", [])]
        return "(guest paths: " + ", ".join(where) + ")"
    return f"disk {volume['disk']} {volume['volume']}"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    from rich.table import Table

    @app.command()
    @with_hints({NeedsRoot: "run as root, or use --images-only", InUse: "see `surepoint mounts`"})
    def mount(
        ctx: typer.Context,
        restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest.")],
        directory: Annotated[
            str, typer.Argument(help="Existing directory to mount at (its contents are hidden while mounted).")
        ],
        foreground: Annotated[
            bool, typer.Option("--foreground", help="Stay in the foreground, log to stderr; Ctrl-C unmounts.")
        ] = False,
        cache_size: Annotated[str, typer.Option(help="Chunk cache size (LRU), e.g. 256M, 1G.")] = "256M",
        readahead: Annotated[
            int, typer.Option(help="Chunks fetched ahead of sequential reads (0: none).", min=0, max=64)
        ] = 4,
        images_only: Annotated[
            bool, typer.Option("--images-only", help="Only the raw disk images: no loop devices, no filesystems.")
        ] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Mount a restore point read-only: raw disk images, every filesystem, and the guest's tree.

        DIR/disks/<n>-<name>.raw are the disks; DIR/disk<n>/part<p>/ (DIR/disk<n>/fs/ for a disk
        without partition table, DIR/disk<n>/lvm-<vg>-<lv>/ for an LVM volume) the filesystems,
        mounted read-only without journal replay; DIR/guest/ the guest's tree as its /etc/fstab
        puts the filesystems together.
        Chunks are read on demand from the repository. `surepoint umount DIR` takes it all down.
        """
        from surepoint.jobs.guest_volumes import mount_options
        from surepoint.mount.manager import mount_restore_point

        c: Context = ctx.obj
        repo = c.open_repository()
        point = repo.resolve(restore_point)
        options = mount_options(
            cache_bytes=parse_size(cache_size),
            readahead_chunks=readahead,
            foreground=foreground,
            filesystems=not images_only,
        )
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        state = mount_restore_point(repo, point, directory, options, say=say)
        if foreground:
            out.print(f"unmounted {state.dir}")
            return
        with contextlib.suppress(Exception):
            EventRecorder(c.catalog(), repo.id).record(
                Component.MOUNT, Phase.MOUNT, Outcome.OK, f"mounted at {state.dir}", restore_point=point.id
            )
        if as_json:
            print_json(state.to_json())
            return
        table = Table(title=f"restore point {point.id} ({point.name}) mounted at {state.dir}")
        for col in ("what", "type", "source", "path"):
            table.add_column(col)
        for row in _mount_table(state):
            table.add_row(*row)
        out.print(table)
        layout = state.guest.get("layout") or {}
        if state.guest.get("binds"):
            where = ", ".join(
                f"{printable(m['mountpoint'])} = disk{m['disk']}/{m['volume']}" for m in layout.get("mounts", [])
            )
            out.print(f"the guest's tree at {state.dir}/guest: {where}")
        for entry in layout.get("unresolved", []):
            err.print(
                f"  guest mount point {printable(entry['mountpoint'])} ({printable(entry['spec'])}) not shown: "
                f"{printable(entry['reason'])}"
            )
        if layout.get("note"):
            err.print(f"  no guest view: {printable(layout['note'])}")
        out.print(f"FUSE server pid {state.pid}, log {state.log_path}; unmount with: surepoint umount {state.dir}")

    @app.command()
    @with_hints({InUse: "close what is open there, or use `surepoint umount --lazy`"})
    def umount(
        directory: Annotated[str | None, typer.Argument(help="Where a restore point is mounted.")] = None,
        lazy: Annotated[bool, typer.Option("--lazy", help="Detach even if files are open there.")] = False,
        all_mounts: Annotated[bool, typer.Option("--all", help="Unmount every surepoint mount on this host.")] = False,
    ) -> None:
        """Unmount a restore point: its filesystems, loop devices and FUSE server (and clean crashed mounts)."""
        from surepoint.mount.records import clean_stale, find_state, load_states, teardown

        if bool(directory) == all_mounts:
            raise UsageError("give DIR or --all")
        cleaned = clean_stale(log=lambda m: err.print(f"  {m}"))
        for state in cleaned:
            err.print(f"cleaned up crashed mount of {state.restore_point} at {state.dir}")
        targets = load_states() if all_mounts else []
        if directory:
            state = find_state(directory)
            if state is None:
                if any(s.dir == os.path.realpath(directory) for s in cleaned):
                    return
                raise UsageError(f"no surepoint mount at {directory}")
            targets = [state]
        for state in targets:
            teardown(state, lazy=lazy, log=lambda m: err.print(f"  {m}"))
            out.print(f"unmounted {state.restore_point} from {state.dir}")

    @app.command("mounts")
    def mounts(as_json: JsonOption = False) -> None:
        """List the restore points mounted on this host."""
        from surepoint.mount.records import load_states

        states = load_states()
        if as_json:
            print_json([s.to_json() for s in states])
            return
        table = Table(title="mounted restore points")
        for col in ("directory", "restore point", "name", "pid", "state", "filesystems"):
            table.add_column(col)
        for s in states:
            table.add_row(
                s.dir,
                s.restore_point,
                s.name,
                str(s.pid or ""),
                s.status if s.alive() else "crashed (cleaned by the next mount/umount)",
                ", ".join(f"disk{m['disk']}/{m['volume']} {m['fstype']}" for m in s.mounts),
            )
        out.print(table)

    @app.command("restore-files")
    def restore_files_command(
        ctx: typer.Context,
        restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest.")],
        paths: Annotated[
            list[str],
            typer.Argument(
                help="Files or directories as the guest sees them (from the filesystem's root with --disk)."
            ),
        ],
        to: Annotated[str, typer.Option("--to", help="Target directory (inside the VM with --into-vm).")],
        disk: Annotated[
            int | None, typer.Option(help="Disk number: PATHS are inside that disk's filesystem, not guest paths.")
        ] = None,
        partition: Annotated[
            str | None, typer.Option(help="Partition number, or 'fs' for a whole-disk filesystem.")
        ] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace files that exist in the target.")] = False,
        keep_setuid: Annotated[
            bool, typer.Option("--keep-setuid", help="Keep set-uid/set-gid bits (cleared by default).")
        ] = False,
        into_vm: Annotated[
            str | None, typer.Option("--into-vm", help="Write into this running VM through its guest agent.")
        ] = None,
        inventory: Annotated[
            str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (TOML).")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Copy files and directories out of a restore point, keeping owners, modes, times, symlinks and holes.

        PATHS are guest paths: the guest's /etc/fstab says which disk, partition or LVM volume holds
        them (`/data/app.conf` works when /data is a second disk); with --disk N [--partition P] they
        are paths inside that filesystem instead. Each PATH lands at the same path below --to
        (`/etc/nginx` with `--to /tmp/r` gives /tmp/r/etc/nginx); a new --to is created 0700.
        Owners are the guest's numeric ids; set-uid/set-gid bits are cleared unless --keep-setuid.
        An existing mount of the restore point is reused; otherwise one is made for the copy and
        taken down afterwards.
        """
        from surepoint.jobs.file_restore import FileRestoreRequest, restore_files

        c: Context = ctx.obj
        repo = c.open_repository()
        point = repo.resolve(restore_point)
        request = FileRestoreRequest(paths, to, disk, partition, overwrite, keep_setuid, into_vm, inventory)
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        try:
            events = EventRecorder(c.catalog(), repo.id)
        except SurepointError:
            events = None  # no catalog: the files can still be restored
        result = restore_files(repo, point, request, events=events, log=say)
        report, volume = result.report, result.volume
        where = request.where
        if as_json:
            print_json({"restore_point": point.id, "volume": volume, "target": where, **report.to_json()})
        else:
            out.print(
                f"restored {report.files} files, {report.dirs} directories, {report.symlinks} symlinks "
                f"({report.bytes} bytes of data, {report.sparse_bytes} bytes left as holes) from "
                f"{point.id} {_volume_name(volume)} to {where}"
            )
            for line in report.skipped:
                err.print(f"  skipped {line}")
            for line in report.warnings:
                err.print(f"  warning: {line}")
        if report.errors:
            for line in report.errors:
                err.print(f"  error: {line}")
            raise SurepointError(f"{len(report.errors)} path(s) could not be restored")
