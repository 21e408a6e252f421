"""Set up and take down a mount of a restore point: FUSE server process, loop devices, filesystems.

`mount_restore_point` forks the FUSE server (a daemon by default: its own session, stdio on the
log file) once the repository is open and every index is loaded, waits until the kernel talks to
it, then attaches a read-only loop device per partition (or whole-disk filesystem) of every disk
and mounts what `blkid` recognises, read-only and without journal replay, at DIR/disk<n>/<volume>.
The repository is only read; the server holds a reader lock naming the point while it serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from surepoint.errors import InUse, InvalidArgument, NeedsRoot, RepositoryLocked, SurepointError
from surepoint.mount import fusefs
from surepoint.mount.fusefs import GUEST_DIR, DiskView, composed_path, image_path, volume_path
from surepoint.mount.guest import guest_layout
from surepoint.mount.partitions import PartitionTable, read_partition_table
from surepoint.mount.reader import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_READAHEAD_CHUNKS,
    ChunkCache,
    ChunkReadError,
    DiskReader,
    Prefetcher,
)
from surepoint.mount.records import MountState, clean_stale, is_mountpoint, run, teardown
from surepoint.processes import process_start
from surepoint.repo.locks import is_stale, read_locks
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import MANIFEST_PREFIX, Repository
from surepoint.text import printable

log = logging.getLogger("surepoint.mount")

READY_TIMEOUT = 30.0
# Read-only, and never replay a journal or log: the image must not change, and replaying would
# need writes. nodev/nosuid/noexec: the filesystem comes from a guest and is not trusted.
FS_OPTIONS = {
    "ext2": "ro,noload",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery,nouuid",
    "btrfs": "ro,rescue=nologreplay",
    "vfat": "ro",
    "exfat": "ro",
    "ntfs": "ro",
    "ntfs3": "ro",
    "iso9660": "ro",
}
COMMON_OPTIONS = "nodev,nosuid,noexec"
NOT_FILESYSTEMS = {"swap", "LVM2_member", "crypto_LUKS", "linux_raid_member", "zfs_member", "bcache", "BitLocker"}


# Finds the LVM logical volumes of a disk: (read, disk size, [(offset, size) of its partitions or
# whole disk]) -> [(vg/lv name, [(disk offset, length) pieces], reason it cannot be used or "")].
# Given by the caller (jobs), which has the LVM metadata reader.
LogicalVolumeFinder = Callable[[Callable[[int, int], bytes], int, list[tuple[int, int]]], list[tuple[str, list, str]]]


@dataclass
class MountOptions:
    cache_bytes: int = DEFAULT_CACHE_BYTES
    readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS
    foreground: bool = False
    filesystems: bool = True  # loop-mount the partitions (needs root)
    logical_volumes: LogicalVolumeFinder | None = None  # mount LVM logical volumes too
    guest_view: bool = True  # DIR/guest: the guest's tree after its /etc/fstab (see surepoint.mount.guest)
    reader: str = "mount"  # the reader lock's kind: mount, instant or lab (repo/locks.py)


@dataclass
class Volume:
    name: str  # "part<p>", "fs" or "lvm-<vg>-<lv>"
    offset: int
    size: int
    partition: int | None
    description: str
    partuuid: str = ""
    partlabel: str = ""
    lv: str = ""  # "vg/lv" of a logical volume
    pieces: list[tuple[int, int]] | None = None  # a volume in several pieces: served as one FUSE image
    lvm_pv: bool = False  # an LVM physical volume: never given a loop device (see _mount_volume)


def check_no_exclusive_lock(repository: Repository) -> None:
    """A mount reads only, and writes no lock; it still stays away from an `exclusive` job."""
    for lock in read_locks(repository.backend):
        if lock.kind == "exclusive" and not is_stale(lock):
            raise RepositoryLocked(f"repository is locked ({lock.describe()}); wait for it to finish")


def plan_volumes(disk_number: int, table: PartitionTable, size: int) -> list[Volume]:
    if table.scheme is None:
        return [Volume("fs", 0, size, None, "whole disk")]
    return [
        Volume(f"part{p.number}", p.start, p.size, p.number, p.describe(), p.uuid, p.name) for p in table.partitions
    ]


def plan_logical_volumes(
    read: Callable[[int, int], bytes],
    size: int,
    volumes: list[Volume],
    finder: LogicalVolumeFinder,
    say: Callable[[str], None],
    where: str,
) -> list[Volume]:
    """The LVM logical volumes inside `volumes` that can be loop-mounted: one piece (a loop device at its
    offset) or several (a loop device on a FUSE image that puts them together)."""
    try:
        found = finder(read, size, [(v.offset, v.size) for v in volumes])
    except ChunkReadError as exc:
        say(f"{where}: LVM metadata unreadable: {exc}")
        return []
    result: list[Volume] = []
    taken = {v.name for v in volumes}
    for lv_name, pieces, reason in found:
        label = printable(lv_name)
        if not reason and not pieces:
            reason = "has no extents"
        if reason:
            say(f"{where}: logical volume {label}: {reason}")
            continue
        base = "lvm-" + "".join(c if c.isalnum() or c in "._+" else "-" for c in lv_name.replace("/", "-"))[:100]
        name, n = base, 1
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        if len(pieces) == 1:
            offset, length = pieces[0]
            result.append(Volume(name, offset, length, None, f"logical volume {label}", lv=lv_name))
        else:
            total = sum(length for _offset, length in pieces)
            described = f"logical volume {label} ({len(pieces)} pieces)"
            result.append(Volume(name, 0, total, None, described, lv=lv_name, pieces=list(pieces)))
    return result


def _views(
    repository: Repository,
    point: RestorePoint,
    cache: ChunkCache,
    prefetcher: Prefetcher | None,
    readahead: int,
    say: Callable[[str], None] | None,
) -> list[DiskView]:
    views = []

    def exists() -> bool:
        return repository.backend.exists(MANIFEST_PREFIX + point.id)

    for disk in point.disks:
        index = repository.load_index(point, disk.number)
        reader = DiskReader(point, disk, index, cache, prefetcher, readahead, log=say, point_exists=exists)
        views.append(DiskView(disk.number, reader))
    return views


def mount_restore_point(
    repository: Repository,
    point: RestorePoint,
    directory: str,
    options: MountOptions,
    say: Callable[[str], None] = lambda m: None,
) -> MountState:
    """Mount `point` at `directory`; returns its state (after the foreground server ended, with --foreground)."""
    if options.filesystems and os.geteuid() != 0:
        raise NeedsRoot("mounting filesystems needs root (loop devices)")
    clean_stale(log=say)
    real = os.path.realpath(directory)
    if not os.path.isdir(real):
        raise InvalidArgument(f"{directory} is not a directory: create it first")
    if is_mountpoint(real):
        raise InUse(f"{directory} is already a mountpoint")
    check_no_exclusive_lock(repository)

    # Partition tables are read here, before the fork; the server gets fresh readers and cache.
    probe_cache = ChunkCache(repository.chunks.get, 64 << 20)
    probe = _views(repository, point, probe_cache, None, 0, None)
    tables: dict[int, PartitionTable] = {}
    plans: dict[int, list[Volume]] = {}
    for view in probe:
        try:
            tables[view.number] = read_partition_table(view.reader.read, view.reader.size)
        except ChunkReadError as exc:
            tables[view.number] = PartitionTable("unreadable", [], [f"partition table unreadable: {exc}"])
        table = tables[view.number]
        for warning in table.warnings:
            say(f"disk {view.number}: {warning}")
        if table.scheme != "unreadable":
            plan = plan_volumes(view.number, table, view.reader.size)
            if options.logical_volumes is not None and options.filesystems:
                plan += plan_logical_volumes(
                    view.reader.read, view.reader.size, plan, options.logical_volumes, say, f"disk {view.number}"
                )
            for volume in plan:
                if not volume.lv and _has_lvm_label(view.reader.read, volume.offset, volume.size):
                    volume.lvm_pv = True
            plans[view.number] = plan
            view.volumes = [v.name for v in plan]
            view.composed = {v.name: v.pieces for v in plan if v.pieces}
    del probe_cache

    state = MountState(
        id=secrets.token_hex(6),
        dir=real,
        repository=repository.id,
        location=repository.backend.location,
        restore_point=point.id,
        name=point.name,
        owner=os.getpid(),
        disks=[
            {"number": v.number, "name": v.reader.disk.name, "size": v.reader.size, "image": image_path(real, v)}
            for v in probe
        ],
    )
    # --foreground: a stop signal from now on (even while mounting) means "unmount and exit",
    # handled once everything is mounted, never by breaking off halfway.
    requested: list[int] = []
    deferred = {}
    if options.foreground:
        deferred = {s: signal.signal(s, lambda signum, frame: requested.append(signum)) for s in STOP_SIGNALS}
    try:
        return _mount_and_serve(repository, point, state, probe, plans, options, say, requested)
    finally:
        for s, handler in deferred.items():
            signal.signal(s, handler)


def _mount_and_serve(
    repository: Repository,
    point: RestorePoint,
    state: MountState,
    probe: list[DiskView],
    plans: dict[int, list[Volume]],
    options: MountOptions,
    say: Callable[[str], None],
    requested: list[int],
) -> MountState:
    state.save()
    try:
        server = _start_server(repository, point, state, probe, options)
    except BaseException:
        state.remove()
        raise
    state.pid = server
    state.pid_start = process_start(server)
    state.save()
    try:
        if options.filesystems:
            for view in probe:
                for volume in plans.get(view.number, []):
                    _mount_volume(state, view, volume, say)
            if options.guest_view:
                _mount_guest_view(state, point, say)
        state.status = "mounted"
        state.save()
    except BaseException:
        teardown(state, lazy=True)
        raise
    if options.foreground:
        _wait_foreground(state, say, requested)
    return state


def _start_server(
    repository: Repository, point: RestorePoint, state: MountState, views: list[DiskView], options: MountOptions
) -> int:
    """Fork the FUSE server; return its pid once it serves requests."""
    fusefs.load_mfusepy()  # fail here, in the command, when libfuse 3 is missing
    created_ns = int(datetime.fromisoformat(point.created.replace("Z", "+00:00")).timestamp() * 1e9)
    volumes = {v.number: list(v.volumes) for v in views}
    composed = {v.number: dict(v.composed) for v in views}
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        code = 1
        try:
            os.close(read_fd)
            _become_server(state, options.foreground, write_fd)
            repository.backend.after_fork()
            # The server holds a reader lock for as long as it serves (its thread refreshes it; if
            # the server dies, the lock is stale): forget keeps the point, gc keeps its chunks.
            with repository.reading([point], options.reader, f"{options.reader} at {state.dir}"):
                cache = ChunkCache(repository.chunks.get, options.cache_bytes)
                prefetcher = Prefetcher(cache, workers=2)
                server_views = _views(repository, point, cache, prefetcher, options.readahead_chunks, log.error)
                for v in server_views:
                    v.volumes = volumes[v.number]
                    v.composed = composed[v.number]

                def ready() -> None:
                    log.info("serving restore point %s (%s) at %s", point.id, point.name, state.dir)
                    os.write(write_fd, b"ready\n")
                    os.close(write_fd)

                fusefs.serve(state.dir, server_views, f"surepoint:{state.id}", created_ns, ready)
                prefetcher.close()
            log.info("unmounted %s", state.dir)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - the server reports everything, then exits
            log.exception("mount server failed")
            with contextlib.suppress(OSError):
                os.write(write_fd, f"error: {exc}\n".encode())
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    message = b""
    try:
        while b"\n" not in message:
            ready, _, _ = select.select([read_fd], [], [], READY_TIMEOUT)
            if not ready:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SurepointError(f"the FUSE server did not start within {READY_TIMEOUT:g} s (see {state.log_path})")
            data = os.read(read_fd, 4096)
            if not data:
                break
            message += data
    finally:
        os.close(read_fd)
    line = message.decode(errors="replace").strip()
    if line != "ready":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        detail = line.removeprefix("error: ") or _log_tail(state.log_path)
        raise SurepointError(f"cannot mount {state.dir}: {detail}")
    return pid


def _become_server(state: MountState, foreground: bool, keep_fd: int) -> None:
    """Detach from the command: own session (or process group), stdio to the log, other fds closed."""
    # The command's handlers are not the server's: libfuse installs its own (unmount and end the
    # loop) only where a signal has its default action.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    if foreground:
        os.setpgid(0, 0)  # Ctrl-C goes to the command, which then unmounts in order
    else:
        os.setsid()
    os.chdir("/")
    log_fd = os.open(state.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if foreground:
        os.dup2(2, 1)
    else:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    os.close(null)
    for fd in _open_fds():
        if fd > 2 and fd not in (keep_fd, log_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
    root = logging.getLogger("surepoint.mount")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    file_handler = logging.StreamHandler(os.fdopen(log_fd, "a", buffering=1))
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if foreground:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        root.addHandler(console)
    # mfusepy logs through the "fuse" logger; its messages belong in the same log.
    fuse_log = logging.getLogger("fuse")
    fuse_log.handlers = list(root.handlers)
    fuse_log.setLevel(logging.WARNING)
    fuse_log.propagate = False


def _open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:]) or "no details logged"
    except OSError:
        return "no details logged"


def _has_lvm_label(read: Callable[[int, int], bytes], offset: int, size: int) -> bool:
    """An LVM2 label in one of the first four sectors of a volume (only the magic: a hint, no trust)."""
    try:
        head = read(offset, min(size, 4 * 512))
    except ChunkReadError:
        return False
    return any(
        head[n : n + 8] == b"LABELONE" and head[n + 24 : n + 32] == b"LVM2 001" for n in range(0, len(head), 512)
    )


def _mount_volume(state: MountState, view: DiskView, volume: Volume, say: Callable[[str], None]) -> None:
    where = f"disk {view.number} {volume.name}"
    if volume.lvm_pv:
        # No loop device: the host's udev and LVM would see the guest's volume group on it (and
        # might activate it). Its logical volumes, when asked for, are mounted on their own.
        reason = "holds LVM2_member, not a filesystem (its logical volumes are mounted as lvm-*)"
        state.skipped.append({"disk": view.number, "volume": volume.name, "reason": reason})
        state.save()
        say(f"{where}: not mounted: {reason}")
        return
    image = composed_path(state.dir, view, volume.name) if volume.pieces else image_path(state.dir, view)
    proc = run(
        ["losetup", "-r", "-f", "--show", "-o", str(volume.offset), "--sizelimit", str(volume.size), image],
        check=False,
    )
    device = proc.stdout.strip()
    if proc.returncode != 0 or not device.startswith("/dev/"):
        raise SurepointError(f"losetup for {where} failed: {proc.stderr.strip()}")
    st = os.stat(image)
    loop = {"device": device, "image": image, "offset": volume.offset, "size": volume.size}
    loop.update(dev=st.st_dev, ino=st.st_ino)
    state.loops.append(loop)
    state.save()

    def skip(reason: str) -> None:
        state.skipped.append({"disk": view.number, "volume": volume.name, "reason": reason})
        run(["losetup", "-d", device], check=False)
        state.loops.remove(loop)
        state.save()
        say(f"{where}: not mounted: {reason}")

    probe = run(["blkid", "-p", "-o", "export", device], check=False)
    tags = _blkid_tags(probe.stdout)
    fstype = tags.get("TYPE", "")
    if probe.returncode != 0 or not fstype:
        skip("no filesystem recognised" if probe.returncode == 2 else f"blkid failed: {probe.stderr.strip()}")
        return
    if fstype in NOT_FILESYSTEMS:
        lvm = " (its logical volumes are mounted as lvm-*)" if fstype == "LVM2_member" and volume.partition else ""
        skip(f"holds {fstype}, not a filesystem{lvm}")
        return
    path = volume_path(state.dir, view, volume.name)
    mount_options = FS_OPTIONS.get(fstype, "ro") + "," + COMMON_OPTIONS
    proc = run(["mount", "-t", fstype, "-o", mount_options, device, path], check=False)
    if proc.returncode != 0:
        skip(f"{fstype}: mount failed: {proc.stderr.strip()}")
        return
    state.mounts.append(
        {
            "path": path,
            "device": device,
            "fstype": fstype,
            "disk": view.number,
            "volume": volume.name,
            "partition": volume.partition,
            "options": mount_options,
            "uuid": tags.get("UUID", ""),
            "label": tags.get("LABEL", ""),
            "partuuid": volume.partuuid,
            "partlabel": volume.partlabel,
            "lv": volume.lv,
        }
    )
    state.save()
    say(f"disk {view.number} {volume.name}: {fstype} mounted read-only at {path}")


def _blkid_tags(text: str) -> dict[str, str]:
    """blkid -o export output (KEY=value lines, values shell-escaped) as a dict."""
    tags = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            tags[key.strip()] = re.sub(r"\\(.)", r"\1", value.strip())
    return tags


def _mount_guest_view(state: MountState, point: RestorePoint, say: Callable[[str], None]) -> None:
    """DIR/guest: the root filesystem, with every other filesystem bound at its fstab mount point."""
    names = {d["number"]: d["name"] for d in state.disks}
    layout = guest_layout(state.mounts, names)
    state.guest = {"layout": layout.to_json(), "binds": []}
    if layout.root is None:
        say(f"no guest view: {layout.note}")
        state.save()
        return
    for entry in layout.unresolved:
        say(f"guest view: {printable(entry['mountpoint'])} ({printable(entry['spec'])}) left out: {entry['reason']}")
    base = os.path.join(state.dir, GUEST_DIR)
    for mount in layout.mounts:
        target = os.path.join(base, mount.mountpoint.lstrip("/")) if mount.mountpoint != "/" else base
        shown = printable(mount.mountpoint)
        if mount.mountpoint != "/" and not _inside_directory(base, mount.mountpoint):
            say(f"guest view: {shown} is not a directory in the guest's tree; left out")
            continue
        proc = run(["mount", "--bind", "-o", "ro," + COMMON_OPTIONS, mount.source["path"], target], check=False)
        if proc.returncode != 0:
            say(f"guest view: {shown}: bind mount failed: {proc.stderr.strip()}")
            continue
        run(["mount", "-o", "remount,bind,ro," + COMMON_OPTIONS, target], check=False)
        state.guest["binds"].append(target)
        state.save()
    say(f"guest view at {base}: " + ", ".join(printable(m.mountpoint) for m in layout.mounts))


def _inside_directory(base: str, guest_path: str) -> bool:
    """The guest path is a real directory below `base`, reached without following a symlink."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in guest_path.split("/") if p]:
            if part in (".", ".."):
                return False
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = child
        return True
    finally:
        os.close(fd)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    pass


def _wait_foreground(state: MountState, say: Callable[[str], None], requested: list[int]) -> None:
    """--foreground: stay until Ctrl-C / SIGTERM (then unmount everything) or until the server ends.

    `requested` holds the stop signals that came while mounting: they unmount at once."""

    def stop(signum, frame) -> None:
        raise _Stop()

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        try:
            if requested:
                raise _Stop()
            _, status = os.waitpid(state.pid, 0)  # type: ignore[arg-type]
        except _Stop:
            say("unmounting")
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            teardown(state, lazy=True, log=say)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.pid, 0)  # type: ignore[arg-type]
            return
        teardown(state, lazy=True, log=say)
        raise SurepointError(f"the FUSE server exited unexpectedly (status {status}); see {state.log_path}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
