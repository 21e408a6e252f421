"""How the jobs mount a restore point: every filesystem, LVM logical volumes included, and the
guest's tree (DIR/guest) after its /etc/fstab.

surepoint.mount does the mounting; the LVM metadata reader lives in surepoint.fsmap (which reads
partition tables through surepoint.mount), so the jobs hand it to the mount as a finder.
"""

from __future__ import annotations

from collections.abc import Callable

from surepoint.errors import SurepointError
from surepoint.fsmap import lvm
from surepoint.mount.manager import MountOptions


def logical_volumes(
    read: Callable[[int, int], bytes], size: int, regions: list[tuple[int, int]]
) -> list[tuple[str, list[tuple[int, int]], str]]:
    """The LVM logical volumes whose physical volumes lie in `regions` of one disk:
    (vg/lv, [(disk offset, length)...], why it cannot be mounted or "")."""
    pvs = []
    for start, length in regions:
        try:
            pv = lvm.read_label(read, start, length)
        except SurepointError:
            raise
        except Exception:  # noqa: BLE001 - a damaged label: that region is simply not a PV
            continue
        if pv is not None:
            pvs.append(pv)
    if not pvs:
        return []
    try:
        groups = lvm.volume_groups(pvs)
    except SurepointError:
        raise
    except Exception as exc:  # noqa: BLE001 - metadata from the guest that cannot be read: no LVs
        return [("?", [], f"LVM metadata cannot be read: {exc}")]
    found = []
    for group in groups:
        for volume in group.logical_volumes:
            pieces = [(p.offset, p.length) for p in volume.pieces]
            found.append((volume.name, pieces, volume.unusable))
    return found


def mount_options(**settings) -> MountOptions:
    """MountOptions that also mount LVM logical volumes (the jobs' default)."""
    return MountOptions(logical_volumes=logical_volumes, **settings)
