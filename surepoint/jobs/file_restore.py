"""File-level restore as a job: files and directories out of a restore point, to a directory here
or into a running VM, through a mount of the restore point (an existing one is reused)."""

from __future__ import annotations

import contextlib
import os
import posixpath
from dataclasses import dataclass

from surepoint.errors import InvalidArgument, SurepointError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import at_stake
from surepoint.jobs.guest_volumes import mount_options
from surepoint.jobs.progress import Log, no_log
from surepoint.mount.borrowed import point_mounted
from surepoint.mount.files import CopyReport, GuestTarget, LocalTarget, pick_volume
from surepoint.mount.files import restore_files as copy_files
from surepoint.mount.fusefs import GUEST_DIR
from surepoint.mount.records import MountState
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.text import printable
from surepoint.vm.inventory import guest_agent_for


@dataclass
class FileRestoreRequest:
    paths: list[str]  # guest paths; with `disk`/`partition`: from that filesystem's root
    target: str  # a directory here, or inside the VM `into_vm`
    disk: int | None = None  # default: the only disk with a filesystem
    partition: str | None = None  # a partition number, or "fs" for a whole-disk filesystem
    overwrite: bool = False
    keep_setuid: bool = False
    into_vm: str | None = None
    inventory: str | None = None

    @property
    def where(self) -> str:
        return f"VM {self.into_vm}:{self.target}" if self.into_vm else self.target


@dataclass
class FileRestoreResult:
    volume: dict  # the mounted filesystem the files came from
    report: CopyReport


def _source(state: MountState, request: FileRestoreRequest) -> dict:
    """Where the requested paths are read: the guest's tree (DIR/guest) when no disk is named and the
    guest's /etc/fstab could be mapped, else the filesystem the request or the point singles out."""
    layout = state.guest.get("layout") or {}
    if request.disk is None and request.partition is None and state.guest.get("binds"):
        for path in request.paths:
            wanted = posixpath.normpath("/" + path.lstrip("/"))
            for entry in layout.get("unresolved", []):
                mp = entry["mountpoint"]
                if wanted == mp or wanted.startswith(mp.rstrip("/") + "/"):
                    raise InvalidArgument(
                        f"{printable(path)} lies under {printable(mp)}, which the guest mounts from "
                        f"{printable(entry['spec'])}: {printable(entry['reason'])}; name the filesystem "
                        "and give the path inside it (--disk N [--partition P])"
                    )
        return {
            "disk": None,
            "volume": "guest",
            "path": os.path.join(state.dir, GUEST_DIR),
            "fstype": "guest view",
            "mounts": layout.get("mounts", []),
        }
    try:
        return pick_volume(state.mounts, request.disk, request.partition)
    except SurepointError as exc:
        if request.disk is None and layout.get("note"):
            raise type(exc)(f"{exc} (guest paths need the guest's /etc/fstab: {printable(layout['note'])})") from None
        raise


def restore_files(
    repository: Repository,
    point: RestorePoint,
    request: FileRestoreRequest,
    *,
    events: EventRecorder | None = None,
    log: Log = no_log,
) -> FileRestoreResult:
    """Copy `request.paths` out of `point`, keeping owners, modes, times, symlinks and holes.

    What could not be copied is in the result's report (`errors`); the caller decides how to fail.
    """
    report = CopyReport()

    def left() -> str:
        return (
            f"{report.files} files, {report.dirs} directories and {report.symlinks} symlinks restored to "
            f"{request.where} before the interruption (a file being written is removed); the rest are missing"
        )

    def record(message: str) -> None:
        if events is not None:
            events.record(Component.RESTORE, Phase.FILES, Outcome.FAILED, message, restore_point=point.id)

    with (
        point_mounted(repository, point, mount_options(), purpose="restore-files", say=log) as state,
        at_stake(left, record),
    ):
        volume = _source(state, request)
        if request.into_vm:
            agent = guest_agent_for(request.into_vm, request.inventory)
            try:
                target = GuestTarget(agent, request.target, request.overwrite, report, request.keep_setuid)
                copy_files(volume["path"], request.paths, target, report)
            finally:
                agent.close()
        else:
            target = LocalTarget(request.target, request.overwrite, report, request.keep_setuid)
            try:
                copy_files(volume["path"], request.paths, target, report)
            finally:
                target.close()
    if events is not None:
        with contextlib.suppress(Exception):  # the files are restored: a catalog problem must not hide that
            events.record(
                Component.RESTORE,
                Phase.FILES,
                Outcome.OK if not report.errors else Outcome.FAILED,
                f"{report.files} files, {report.dirs} directories, {report.symlinks} symlinks to {request.where}",
                restore_point=point.id,
            )
    return FileRestoreResult(volume, report)
