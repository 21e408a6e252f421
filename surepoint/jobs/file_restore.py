"""File-level restore as a job: files and directories out of a restore point, to a directory here
or into a running VM, through a mount of the restore point (an existing one is reused)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from surepoint.errors import SurepointError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.jobs.progress import Log, no_log
from surepoint.mount.files import CopyReport, GuestTarget, LocalTarget, pick_volume
from surepoint.mount.files import restore_files as copy_files
from surepoint.mount.manager import MountOptions, mount_restore_point
from surepoint.mount.records import MountState, clean_stale, load_states, state_dir, teardown
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.vm.inventory import guest_agent_for


@dataclass
class FileRestoreRequest:
    paths: list[str]  # from the filesystem's root
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


def _mounted(repository: Repository, point: RestorePoint) -> MountState | None:
    for s in load_states():
        if s.restore_point == point.id and s.repository == repository.id and s.status == "mounted" and s.alive():
            return s
    return None


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
    clean_stale(log=log)
    state = _mounted(repository, point)
    own_dir = None
    if state is None:
        base = os.path.dirname(state_dir().rstrip("/"))
        os.makedirs(base, mode=0o700, exist_ok=True)
        own_dir = tempfile.mkdtemp(prefix="restore-files-", dir=base)
        try:
            state = mount_restore_point(repository, point, own_dir, MountOptions(), say=log)
        except BaseException:
            os.rmdir(own_dir)
            raise
    report = CopyReport()
    try:
        volume = pick_volume(state.mounts, request.disk, request.partition)
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
    finally:
        if own_dir is not None:
            try:
                teardown(state, lazy=False)
            except SurepointError:
                teardown(state, lazy=True)
            with contextlib.suppress(OSError):
                os.rmdir(own_dir)
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
