"""`surepoint instant-recover`: boot a VM straight from the repository, then migrate it or discard it.

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

import contextlib
from typing import Annotated

import typer

from surepoint.cli.common import Context, JsonOption, err, out, parse_size, print_json, with_hints
from surepoint.errors import InUse, NotAVmBackup, NotFound, UsageError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""

    @app.command("instant-recover")
    @with_hints(
        {
            InUse: "use another --workdir, or --migrate-to DIR or --discard with this --workdir "
            "(--discard also cleans up a crashed one)",
            NotAVmBackup: "`surepoint restore` restores the disks of a file backup; `surepoint vm restore` "
            "recreates a VM whose command line cannot be used here",
            NotFound: "give the --workdir of an instant recovery (see `surepoint mounts`)",
        }
    )
    def instant_recover(
        ctx: typer.Context,
        restore_point: Annotated[
            str | None, typer.Argument(help="Id, id prefix, or NAME:latest of a VM restore point (to boot).")
        ] = None,
        workdir: Annotated[
            str | None,
            typer.Option(
                "--workdir",
                help="Directory of the instant session: overlays, sockets, the repository mount, instant.json "
                "(default /var/lib/surepoint/instant/<restore point id>).",
            ),
        ] = None,
        migrate_to: Annotated[
            str | None,
            typer.Option(
                "--migrate-to",
                help="Copy the running instant VM's disks into this directory (QEMU block mirror) and switch "
                "it over; the repository is then no longer used.",
            ),
        ] = None,
        discard: Annotated[
            bool, typer.Option("--discard", help="Stop the instant VM, drop its overlays, unmount the repository.")
        ] = False,
        boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 300,
        cache_size: Annotated[str, typer.Option(help="Chunk cache of the repository mount, e.g. 256M, 1G.")] = "256M",
        as_json: JsonOption = False,
    ) -> None:
        """Instant VM recovery: boot a VM from a restore point within seconds, disks served from the repository.

        The disks are the restore point's raw images on a read-only FUSE mount of the repository,
        each the backing file of a qcow2 overlay in the workdir that takes every guest write. Then
        either `--migrate-to DIR --workdir W` (live copy to production storage, switch-over, unmount)
        or `--discard --workdir W` (stop the VM, throw its writes away).
        """
        from surepoint.mount.instant import (
            default_workdir,
            discard_instant,
            migrate_instant,
            start_instant,
        )
        from surepoint.mount.manager import MountOptions

        c: Context = ctx.obj
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        if migrate_to and discard:
            raise UsageError("--migrate-to and --discard exclude each other")
        if migrate_to or discard:
            if workdir is None:
                if restore_point is None:
                    raise UsageError("give --workdir (or the restore point, for its default workdir)")
                workdir = default_workdir(c.open_repository().resolve(restore_point))
            if discard:
                session = discard_instant(workdir, log=say)
                with contextlib.suppress(Exception):
                    EventRecorder(c.catalog(), session.repository).record(
                        Component.INSTANT,
                        Phase.DISCARD,
                        Outcome.OK,
                        f"instant VM in {session.workdir} discarded",
                        restore_point=session.restore_point,
                    )
                if as_json:
                    print_json({"discarded": session.workdir, "restore_point": session.restore_point})
                else:
                    out.print(f"discarded the instant VM of {session.restore_point} in {session.workdir}")
                return
            stake = (
                f"the instant VM in {workdir} keeps running; a mirror that had not switched over is cancelled and "
                "its target images removed (migrate again)"
            )
            with at_stake(stake):
                session = migrate_instant(workdir, migrate_to, log=say)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                EventRecorder(c.catalog(), session.repository).record(
                    Component.INSTANT,
                    Phase.MIGRATE,
                    Outcome.OK,
                    f"instant VM migrated to {session.migrated_to}",
                    restore_point=session.restore_point,
                )
            if as_json:
                print_json(session.to_json())
            else:
                out.print(
                    f"VM {session.name} (pid {session.pid}) now runs from {session.migrated_to}: "
                    + ", ".join(session.disks)
                )
            return
        if restore_point is None:
            raise UsageError("give the restore point to boot (or --migrate-to / --discard with --workdir)")
        repo = c.open_repository()
        point = repo.resolve(restore_point)
        with at_stake("no instant VM was left running: its VM, overlays and repository mount are removed"):
            session = start_instant(
                repo,
                point,
                workdir,
                boot_timeout=boot_timeout,
                options=MountOptions(cache_bytes=parse_size(cache_size)),
                log=say,
            )
        with contextlib.suppress(Exception):
            EventRecorder(c.catalog(), repo.id).record(
                Component.INSTANT,
                Phase.BOOT,
                Outcome.OK,
                f"instant VM booted from the repository in {session.workdir}",
                restore_point=point.id,
            )
        if as_json:
            print_json(session.to_json())
            return
        out.print(
            f"VM {session.name} (pid {session.pid}) runs from restore point {point.id}; guest agent answered "
            f"{session.total_seconds:.1f} s after the command started (QEMU boot {session.boot_seconds:.1f} s)"
        )
        out.print(f"QMP {session.qmp}, guest agent {session.guest_agent}, writes go to {session.workdir}")
        out.print(f"then: surepoint instant-recover --workdir {session.workdir} --migrate-to DIR   (or --discard)")
