"""The free-space map of a whole disk: partitions (MBR, GPT), LVM inside them, and their filesystems."""

from __future__ import annotations

from dataclasses import dataclass, field

from surepoint.errors import SurepointError
from surepoint.fsmap import ext4, lvm, swap, xfs
from surepoint.fsmap.volume import Inconsistent, NotUnderstood, ReadFn, Status, Volume
from surepoint.mount.partitions import read_partition_table
from surepoint.repo.extents import Extent, merge

MIN_VOLUME = 64 * 1024  # smaller regions (BIOS boot partitions, gaps) are not worth probing


@dataclass
class DiskMap:
    """Every volume found on one disk and how a backup treats it."""

    volumes: list[Volume] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def free(self) -> list[Extent]:
        return merge(e for v in self.volumes for e in v.free)

    @property
    def free_bytes(self) -> int:
        return sum(e.length for e in self.free)

    def summary(self) -> list[dict]:
        return [v.as_dict() for v in self.volumes]


def map_disk(read: ReadFn, size: int) -> DiskMap:
    """Find the free byte ranges of a disk whose bytes `read(offset, length)` returns.

    Never raises for what it finds on the disk: anything it cannot vouch for is a volume with
    status READ and a reason, and contributes no free ranges. Errors from `read` itself propagate.
    """
    result = DiskMap()
    table = read_partition_table(read, size)
    result.warnings.extend(table.warnings)
    if table.scheme is None:
        regions = [("whole disk", 0, size)]
    else:
        regions = [(f"partition {p.number}", p.start, p.size) for p in table.partitions]
    pvs: list[lvm.PhysicalVolume] = []
    for where, start, length in regions:
        if length < MIN_VOLUME:
            continue
        try:
            pv = lvm.read_label(read, start, length)
        except SurepointError:
            raise
        except Exception as exc:  # noqa: BLE001
            result.volumes.append(Volume(where, start, length, "LVM2 PV", Status.READ, str(exc)))
            continue
        if pv is not None:
            pvs.append(pv)
            result.volumes.append(Volume(where, start, length, "LVM2 PV", Status.MAPPED, "physical volume"))
            continue
        result.volumes.append(map_volume(where, _offset_reader(read, start), start, length))
    if pvs:
        _map_lvm(read, pvs, result)
    return result


def map_volume(where: str, read: ReadFn, start: int, size: int) -> Volume:
    """One volume that starts at disk offset `start`; `read` takes offsets within the volume."""
    kind = "unknown"
    try:
        if ext4.probe(read, size):
            kind, finder, status = "ext4", ext4.free_extents, Status.MAPPED
        elif xfs.probe(read, size):
            kind, finder, status = "xfs", xfs.free_extents, Status.MAPPED
        elif swap.page_size(read, size) is not None:
            kind, finder, status = "swap", swap.free_extents, Status.SKIPPED
        else:
            return Volume(where, start, size, "unknown", Status.READ, "no filesystem this reader understands")
        free = finder(read, size)
    except (NotUnderstood, Inconsistent) as exc:
        return Volume(where, start, size, kind, Status.READ, str(exc))
    except SurepointError:
        raise  # the source could not be read: the backup would fail on it too
    except Exception as exc:  # noqa: BLE001 - metadata a parser did not foresee costs a full read, never a backup
        return Volume(where, start, size, kind, Status.READ, f"unreadable metadata ({type(exc).__name__}: {exc})")
    return Volume(where, start, size, kind, status, "", [Extent(start + e.offset, e.length) for e in free])


def _map_lvm(read: ReadFn, pvs: list[lvm.PhysicalVolume], result: DiskMap) -> None:
    try:
        groups = lvm.volume_groups(pvs)
    except SurepointError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in map_volume: no free space from metadata we cannot read
        result.warnings.append(f"LVM: {exc}")
        return
    for vg in groups:
        if vg.unallocated:
            result.volumes.append(
                Volume(
                    f"volume group {vg.name}",
                    vg.unallocated[0].offset,
                    sum(e.length for e in vg.unallocated),
                    "unallocated extents",
                    Status.SKIPPED,
                    "",
                    vg.unallocated,
                )
            )
        for lv in vg.logical_volumes:
            where = f"logical volume {lv.name}"
            start = lv.pieces[0].offset if lv.pieces else 0
            if lv.unusable:
                result.volumes.append(Volume(where, start, lv.size, "unknown", Status.READ, lv.unusable))
                continue
            volume = map_volume(where, lv.reader(read), 0, lv.size)
            volume.free = merge(lv.to_disk(volume.free))
            volume.start = start
            result.volumes.append(volume)


def _offset_reader(read: ReadFn, start: int) -> ReadFn:
    return lambda offset, length: read(start + offset, length)
