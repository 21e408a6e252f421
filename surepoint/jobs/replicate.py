"""Replicate a running VM: one cycle sends the blocks changed since the replica's latest point, taken
from the same quiesced point-in-time view as a backup, and commits them as a new replica point.

Each replica has its own dirty-bitmap chain on the source's disks, named `surepoint-r<replica
id>-<point id>`: a backup's bitmaps (`surepoint-<repository id>-...`) and another replica's are
never used nor removed by a cycle, so backups to any number of repositories and replicas to any
number of targets each stay incremental. The first cycle sends every block that is not zero (the
replica stays thin); a cycle whose bitmap is missing or untrustworthy (the VM restarted with raw
disks, a cycle whose commit was not acknowledged, a replica point forgotten) compares checksums of
the replica's blocks with the source's and sends only the blocks that differ, and says so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from surepoint.errors import InvalidArgument, SurepointError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.jobs.vm_capture import (
    CaptureOptions,
    VmCapture,
    clean_dead_views,
    disk_name,
    remove_stale_bitmaps,
    usable_bitmap,
)
from surepoint.replica.layout import DEFAULT_KEEP, default_name, new_point_id
from surepoint.replica.receiver import block_digests
from surepoint.replica.site import Session, Site
from surepoint.repo.extents import Extent
from surepoint.timestamps import utc_now
from surepoint.vm.errors import QmpError
from surepoint.vm.info import VmInfo
from surepoint.vm.inventory import find_vm
from surepoint.vm.libvirt_domain import open_qmp
from surepoint.vm.qmp import BlockDevice, QmpConnection

BLOCK = 64 << 10  # the unit of comparison and of skipped zeros: qcow2's default cluster size
WINDOW = 4 << 20  # read from the source at most this much at a time
COMPARE_WINDOW = 16 << 20  # checksums asked of the replica at a time

FULL = "full"
BITMAP = "dirty bitmap"
COMPARE = "checksum compare"
SEED = "seeded"


def bitmap_prefix(replica_id: str) -> str:
    """The prefix of one replica's dirty bitmaps on the source (distinct from any repository's)."""
    return f"surepoint-r{replica_id[:12]}-"


@dataclass
class ReplicateOptions:
    keep: int = DEFAULT_KEEP
    replica_name: str | None = None
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    seed_from: str | None = None  # REPOSITORY:POINT at the replica's site, for a first cycle
    full: bool = False  # compare every block even if the bitmap is usable


@dataclass
class Transfer:
    """What a cycle moved: data written, ranges zeroed, bytes compared by checksum."""

    sent_bytes: int = 0
    zeroed_bytes: int = 0
    compared_bytes: int = 0
    read_bytes: int = 0


@dataclass
class CycleResult:
    vm: str
    replica: str
    point: str
    time: str
    consistency: str
    cbt: str
    transfer: Transfer
    seconds: float
    freeze_seconds: float
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "replica": self.replica,
            "point": self.point,
            "time": self.time,
            "consistency": self.consistency,
            "cbt": self.cbt,
            "sent_bytes": self.transfer.sent_bytes,
            "zeroed_bytes": self.transfer.zeroed_bytes,
            "compared_bytes": self.transfer.compared_bytes,
            "read_bytes": self.transfer.read_bytes,
            "seconds": round(self.seconds, 3),
            "freeze_seconds": round(self.freeze_seconds, 3),
            "notes": self.notes,
            "dropped": self.dropped,
        }


# -- moving blocks (pure over a source and a session) --------------------------------------------


class Readable(Protocol):
    """What the transfer needs of a disk source: its size and reads."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


def windows(extents: list[Extent], size: int, step: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most `step` covering `extents`, widened to whole BLOCKs."""
    for ext in extents:
        start = ext.offset - ext.offset % BLOCK
        end = min(size, -(-ext.end // BLOCK) * BLOCK)
        pos = start
        while pos < end:
            n = min(step, end - pos)
            yield pos, n
            pos += n


def _runs(flags: list[bool]) -> Iterator[tuple[int, int]]:
    """(first, end) index ranges of consecutive True flags."""
    start = None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            yield start, i
            start = None
    if start is not None:
        yield start, len(flags)


def _put(session: Session, device: str, offset: int, data: bytes, blocks: list[int], sent: Transfer) -> None:
    """Write the given block numbers of `data` (read at `offset`): data runs as writes, zero runs as zeroing."""
    zero = bytes(BLOCK)
    wanted = set(blocks)
    count = -(-len(data) // BLOCK)
    is_zero = [
        data[i * BLOCK : (i + 1) * BLOCK] == zero[: len(data[i * BLOCK : (i + 1) * BLOCK])] for i in range(count)
    ]
    for first, end in _runs([i in wanted and not is_zero[i] for i in range(count)]):
        session.write(device, offset + first * BLOCK, data[first * BLOCK : end * BLOCK])
        sent.sent_bytes += len(data[first * BLOCK : end * BLOCK])
    for first, end in _runs([i in wanted and is_zero[i] for i in range(count)]):
        length = min(len(data), end * BLOCK) - first * BLOCK
        session.zero(device, offset + first * BLOCK, length)
        sent.zeroed_bytes += length


def send_extents(
    source: Readable, session: Session, device: str, extents: list[Extent], sent: Transfer, *, first: bool
) -> None:
    """Send what lies in `extents`. A first cycle skips zero blocks (the new base reads zeros there);
    a later one zeroes them (the replica may hold data there)."""
    for offset, length in windows(extents, source.size, WINDOW):
        data = source.read(offset, length)
        sent.read_bytes += length
        count = -(-length // BLOCK)
        if first:
            zero = bytes(BLOCK)
            blocks = [
                i for i in range(count) if data[i * BLOCK : (i + 1) * BLOCK] != zero[: min(BLOCK, length - i * BLOCK)]
            ]
        else:
            blocks = list(range(count))
        _put(session, device, offset, data, blocks, sent)


def send_differences(source: Readable, session: Session, device: str, sent: Transfer) -> None:
    """Compare the replica's blocks with the source's by checksum; send the ones that differ."""
    for offset in range(0, source.size, COMPARE_WINDOW):
        length = min(COMPARE_WINDOW, source.size - offset)
        theirs = session.checksums(device, offset, length, BLOCK)
        data = source.read(offset, length)
        sent.read_bytes += length
        sent.compared_bytes += length
        ours = block_digests(data, BLOCK)
        width = len(ours) // max(1, -(-length // BLOCK))
        differing = [
            i
            for i in range(-(-length // BLOCK))
            if ours[i * width : (i + 1) * width] != theirs[i * width : (i + 1) * width]
        ]
        if differing:
            _put(session, device, offset, data, differing, sent)


# -- one cycle ----------------------------------------------------------------------------------


def _source_config(vm: VmInfo, devices: list[BlockDevice]) -> dict[str, Any]:
    return {
        "argv": list(vm.command_line),
        "libvirt_xml": vm.domain_xml,
        "disks": [{"device": disk_name(d), "virtual_size": d.size, "filename": d.filename} for d in devices],
    }


def _plan(
    qmp: QmpConnection, devices: list[BlockDevice], info: dict[str, Any], options: ReplicateOptions, notes: list[str]
) -> tuple[str, str | None]:
    """How this cycle finds the changes: (mode, bitmap to read or None)."""
    latest = info.get("latest")
    if latest is None:
        return (SEED if options.seed_from else FULL), None
    sizes = info.get("sizes", {})
    if any(sizes.get(disk_name(d)) != d.size for d in devices):
        notes.append("the VM's disks changed since the replica's latest point: comparing checksums of every block")
        return COMPARE, None
    if options.full:
        notes.append("comparing checksums of every block, as asked")
        return COMPARE, None
    bitmap = latest.get("bitmap")
    fallback = "comparing checksums of the replica's blocks with the source's"
    if not bitmap:
        notes.append(f"the replica's latest point {latest['id']} has no dirty bitmap: {fallback}")
        return COMPARE, None
    if not usable_bitmap(qmp, devices, bitmap, notes, fallback):
        return COMPARE, None
    return BITMAP, bitmap


def replicate_vm(
    vm: VmInfo,
    site: Site,
    options: ReplicateOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    passphrase: Callable[[], str] | None = None,
) -> CycleResult:
    """One replication cycle of `vm` to its replica at `site`; the committed point's figures."""
    options = options or ReplicateOptions()
    say = log or (lambda _m: None)
    name = options.replica_name or default_name(vm.name)
    started = time.monotonic()
    notes: list[str] = []
    event = replace(
        EventRecorder(None, f"replica:{site.location}", source=vm.name), echo=lambda m: say(f"{vm.name}: {m}")
    )
    capture = VmCapture(vm, options.capture, event)
    session: Session | None = None
    taken = False
    try:
        with open_qmp(vm) as qmp:
            clean_dead_views(qmp, event)
            devices = qmp.block_devices()
            if not devices:
                raise QmpError(f"VM {vm.name} has no disks")
            session = site.session(name)
            info = session.open(vm.name, _source_config(vm, devices))
            notes += info.get("notes", [])
            prefix = bitmap_prefix(str(info["replica_id"]))
            mode, bitmap = _plan(qmp, devices, info, options, notes)
            # the latest point's bitmap stays even when unused (a --full cycle may fail; then the next
            # one still has it); once a newer point is committed it is stale and goes next time
            latest_bitmap = (info.get("latest") or {}).get("bitmap")
            remove_stale_bitmaps(qmp, devices, prefix, {b for b in (bitmap, latest_bitmap) if b})
            point_id = new_point_id()
            new_bitmap = prefix + point_id
            session.begin(point_id, {disk_name(d): d.size for d in devices})
            retire = mode == BITMAP
            if mode == SEED:
                mode, bitmap = _seed(qmp, devices, session, options, notes, passphrase)
            for note in notes:
                event(Component.CBT, Phase.PLAN, Outcome.WARNING, note)
            capture.open()
            view = capture.take(qmp, devices, bitmap_name=bitmap, new_bitmap=new_bitmap, retire_base_bitmap=retire)
            taken = True
            when = utc_now()
            outcome = capture.outcome
            assert outcome is not None
            sent = Transfer()
            for dev in devices:
                source = view.source(disk_name(dev))
                try:
                    if mode == COMPARE:
                        send_differences(source, session, disk_name(dev), sent)
                    elif mode == FULL:
                        send_extents(source, session, disk_name(dev), source.allocated(), sent, first=True)
                    else:  # a bitmap: this replica's own, or the seeding backup's
                        send_extents(source, session, disk_name(dev), source.changed() or [], sent, first=False)
                finally:
                    source.close()
            committed = session.commit(
                {
                    "time": when,
                    "consistency": outcome.level,
                    "cbt": mode,
                    "notes": notes + outcome.failures,
                    "bitmap": new_bitmap,
                },
                options.keep,
            )
            capture.finish()
            capture.complete(point_id)
    except BaseException:
        if taken:
            capture.abort()
        if session is not None:
            session.abort()
        raise
    finally:
        if session is not None:
            session.close()
        capture.close()
    point = committed["point"]
    return CycleResult(
        vm=vm.name,
        replica=f"{site.location.rstrip('/')}/{name}",
        point=point["id"],
        time=when,
        consistency=outcome.level,
        cbt=mode,
        transfer=sent,
        seconds=time.monotonic() - started,
        freeze_seconds=outcome.freeze_seconds,
        notes=notes + outcome.failures + list(committed.get("notes", [])),
        dropped=list(committed.get("dropped", [])),
    )


def split_seed(spec: str) -> tuple[str, str]:
    """REPOSITORY:POINT -> (repository, point): the first ':' after a URL's scheme and host[:port] ends the
    repository (a point may be NAME:latest)."""
    authority = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*", spec)
    cut = spec.find(":", authority.end() if authority else 0)
    if cut <= 0 or cut == len(spec) - 1:
        raise InvalidArgument(f"{spec!r} is not REPOSITORY:POINT (a point id, or NAME:latest)")
    return spec[:cut], spec[cut + 1 :]


def _seed(
    qmp: QmpConnection,
    devices: list[BlockDevice],
    session: Session,
    options: ReplicateOptions,
    notes: list[str],
    passphrase: Callable[[], str] | None,
) -> tuple[str, str | None]:
    """Fill the new bases from a restore point at the replica's site; then how to find the changes since."""
    assert options.seed_from
    repository, point = split_seed(options.seed_from)
    names = [disk_name(d) for d in devices]
    seeded = session.seed_from(repository, point, names, passphrase)
    missing = [n for n in names if n not in seeded.get("seeded", [])]
    notes.append(f"seeded from restore point {seeded.get('restore_point')} of {repository}")
    if missing:
        notes.append(f"the restore point has no disk {', '.join(missing)}: comparing checksums")
        return COMPARE, None
    bitmap = seeded.get("bitmap")
    fallback = "comparing checksums of the seeded replica with the source"
    if bitmap and usable_bitmap(qmp, devices, bitmap, notes, fallback):
        notes.append(f"sending the changes since that backup (its dirty bitmap {bitmap})")
        return BITMAP, bitmap
    if not bitmap:
        notes.append(f"the restore point left no dirty bitmap: {fallback}")
    return COMPARE, None


def replicate_vms(
    names: list[str],
    site: Site,
    options: ReplicateOptions,
    *,
    inventory: str | None = None,
    log: Callable[[str], None] | None = None,
    passphrase: Callable[[], str] | None = None,
) -> list[tuple[str, CycleResult | None, str | None]]:
    """One cycle for each VM, one after the other; (name, result, error) in the order of `names`."""
    outcomes: list[tuple[str, CycleResult | None, str | None]] = []
    for name in names:
        try:
            vm = find_vm(name, inventory)
            outcomes.append((name, replicate_vm(vm, site, options, log=log, passphrase=passphrase), None))
        except SurepointError as exc:
            outcomes.append((name, None, str(exc)))
    return outcomes
