"""A restore point's filesystems for the length of one job: its live mount, or a private temporary one.

Jobs that read files out of a restore point (restore-files, scan, index, restore-app) first look for
a live `surepoint mount` of the same point of the same repository and read through it: nothing is
mounted twice, and the operator's mount is left as it was. Otherwise they mount the point in a
private directory next to the mounts' state directory (mode 0700) and tear it down when the job
ends, however it ends; a teardown that fails is retried lazily so that no mount outlives the job.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

from surepoint.errors import SurepointError
from surepoint.mount.manager import MountOptions, mount_restore_point
from surepoint.mount.records import MountState, clean_stale, load_states, state_dir, teardown
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository


def live_mount(repository_id: str, point_id: str) -> MountState | None:
    """The running `surepoint mount` of this point of this repository, if there is one."""
    for state in load_states():
        ours = state.restore_point == point_id and state.repository == repository_id
        if ours and state.status == "mounted" and state.alive():
            return state
    return None


@contextlib.contextmanager
def point_mounted(
    repository: Repository,
    point: RestorePoint,
    options: MountOptions,
    *,
    purpose: str,
    say: Callable[[str], None] = lambda m: None,
) -> Iterator[MountState]:
    """The point mounted for the block: a live mount is reused (and left), else one is made and removed.

    `purpose` names the temporary directory (e.g. "scan"), so that a leftover says whose it was.
    """
    clean_stale(log=say)
    state = live_mount(repository.id, point.id)
    if state is not None:
        yield state
        return
    base = os.path.dirname(state_dir().rstrip("/"))
    os.makedirs(base, mode=0o700, exist_ok=True)
    own_dir = tempfile.mkdtemp(prefix=f"{purpose}-", dir=base)
    try:
        state = mount_restore_point(repository, point, own_dir, options, say=say)
    except BaseException:
        os.rmdir(own_dir)
        raise
    try:
        yield state
    finally:
        try:
            teardown(state, lazy=False)
        except SurepointError:
            teardown(state, lazy=True)
        with contextlib.suppress(OSError):
            os.rmdir(own_dir)
