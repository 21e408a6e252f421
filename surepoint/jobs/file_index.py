"""The file index: which files each restore point holds, in the catalog, so `find` needs no mount.

A restore point is indexed after its backup (`surepoint index`, or `vm backup --index`). For each
filesystem the mount finds (partitions, whole-disk filesystems, LVM logical volumes) the index
keeps its file list (path, type, size, modification time) and where the guest mounts it (its
/etc/fstab, see surepoint.mount.guest), so a path is found as the guest sees it.

Cheap when little changed: a filesystem's *content digest* is the digest of the chunk ids that
cover its bytes (read from the restore point's disk index, no data read). A filesystem whose
digest already has a listing in the catalog (an earlier restore point, where its bytes were the
same) reuses that listing without being walked; when every filesystem of a point is known (and
so is its mount point), the point is indexed without mounting it at all. Only changed filesystems
are mounted and walked.

Names from the guest are stored as text (bytes that are not UTF-8 as backslash escapes) and are
printed through surepoint.text.printable by the commands.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from surepoint.catalog import Catalog, FileIndexCatalog, IndexedVolume
from surepoint.jobs.guest_volumes import logical_volumes, mount_options
from surepoint.mount.borrowed import point_mounted
from surepoint.mount.manager import Volume, plan_logical_volumes, plan_volumes
from surepoint.mount.partitions import read_partition_table
from surepoint.mount.reader import ChunkCache, ChunkReadError, DiskReader
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository

MAX_ENTRIES = 20_000_000  # per filesystem: a guest cannot make the catalog grow without bound
PROBE_CACHE = 64 << 20


@dataclass
class IndexResult:
    restore_point: str
    name: str
    volumes: list[dict] = field(default_factory=list)  # {"disk", "volume", "mountpoint", "entries", "reused"}
    mounted: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _text(name: str) -> str:
    """A name from the guest as storable text: undecodable bytes become backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _content_digest(repository: Repository, point: RestorePoint, disk: int, volume: Volume) -> str:
    index = repository.load_index(point, disk)
    digest = hashlib.sha256(f"{index.chunk_size}:".encode())
    for offset, size in volume.pieces or [(volume.offset, volume.size)]:
        first = offset // index.chunk_size
        last = (offset + max(size, 1) - 1) // index.chunk_size
        digest.update(f"{offset}:{size}:".encode())
        for chunk_id in index.ids[first : last + 1]:
            digest.update(chunk_id)
    return digest.hexdigest()


def plan_point(repository: Repository, point: RestorePoint, say: Callable[[str], None]) -> dict[tuple[int, str], str]:
    """(disk, volume) -> content digest of every volume a mount of `point` would mount."""
    cache = ChunkCache(repository.chunks.get, PROBE_CACHE)
    plans: dict[tuple[int, str], str] = {}
    for disk in point.disks:
        index = repository.load_index(point, disk.number)
        reader = DiskReader(point, disk, index, cache, None, 0)
        try:
            table = read_partition_table(reader.read, reader.size)
        except ChunkReadError as exc:
            say(f"disk {disk.number}: partition table unreadable: {exc}")
            continue
        volumes = plan_volumes(disk.number, table, reader.size)
        volumes += plan_logical_volumes(
            reader.read, reader.size, volumes, logical_volumes, lambda _m: None, f"disk {disk.number}"
        )
        for volume in volumes:
            plans[(disk.number, volume.name)] = _content_digest(repository, point, disk.number, volume)
    return plans


def walk(root: str) -> Iterator[tuple[str, str, str, int, int]]:
    """(path, name, type, size, mtime_ns) of everything below `root`, never following a symlink or
    leaving its filesystem; paths start at "/" (the root itself is left out)."""
    top = os.lstat(root)
    stack = [("", root)]
    count = 0
    while stack:
        rel, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            child = f"{rel}/{entry.name}"
            mode = st.st_mode
            kind = "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else "l" if stat.S_ISLNK(mode) else "o"
            yield _text(child), _text(entry.name), kind, st.st_size if kind == "f" else 0, st.st_mtime_ns
            count += 1
            if count >= MAX_ENTRIES:
                return
            if kind == "d" and st.st_dev == top.st_dev:
                stack.append((child, entry.path))


def index_point(
    repository: Repository,
    catalog: Catalog,
    point: RestorePoint,
    *,
    log: Callable[[str], None] | None = None,
) -> IndexResult:
    """Index the files of `point` (see the module docstring)."""
    import time

    say = log or (lambda _m: None)
    started = time.monotonic()
    files = FileIndexCatalog(catalog)
    result = IndexResult(point.id, point.name)
    plans = plan_point(repository, point, say)
    known = {key: files.listing_for(repository.id, digest) for key, digest in plans.items()}
    volumes: list[IndexedVolume] = []
    if known and all(known.values()):
        for (disk, volume), listing in known.items():
            mountpoint = files.mountpoint_of(repository.id, point.name, disk, volume, listing)  # type: ignore[arg-type]
            if mountpoint is False:
                break
            volumes.append(IndexedVolume(disk, volume, mountpoint, listing))  # type: ignore[arg-type]
        else:
            files.record_point(repository.id, point.id, point.name, point.created, volumes)
            result.volumes = [dict(v.__dict__, reused=True) for v in volumes]
            result.seconds = round(time.monotonic() - started, 2)
            say(f"{point.id}: every filesystem is unchanged since an indexed restore point; nothing mounted")
            return result
        volumes = []
    with point_mounted(repository, point, mount_options(), purpose="index", say=say) as state:
        result.mounted = True
        mountpoints = {
            (m["disk"], m["volume"]): m["mountpoint"] for m in (state.guest.get("layout") or {}).get("mounts", [])
        }
        for mount in state.mounts:
            key = (mount["disk"], mount["volume"])
            digest = plans.get(key)
            if digest is None:  # the plan and the mount disagree (unreadable then, readable now)
                continue
            listing = known.get(key)
            reused = listing is not None
            if listing is None:
                say(f"disk {key[0]} {key[1]}: listing files")
                listing = files.add_listing(repository.id, digest, mount["fstype"], walk(mount["path"]))
            volumes.append(IndexedVolume(key[0], key[1], mountpoints.get(key), listing))
            result.volumes.append(dict(volumes[-1].__dict__, reused=reused))
        mounted = {(m["disk"], m["volume"]) for m in state.mounts}
        for key, digest in plans.items():  # no filesystem there (a PV, swap...): an empty listing, so
            if key not in mounted:  # that an unchanged one does not make the next point mount again
                listing = files.add_listing(repository.id, digest, "", iter(()))
                volumes.append(IndexedVolume(key[0], key[1], None, listing))
        files.record_point(repository.id, point.id, point.name, point.created, volumes)
        for skipped in state.skipped:
            result.notes.append(f"disk {skipped['disk']} {skipped['volume']}: not indexed: {skipped['reason']}")
    result.seconds = round(time.monotonic() - started, 2)
    return result


# ---- find ---------------------------------------------------------------------------------------


@dataclass
class Version:
    restore_point: str
    created: str
    change: str  # present (in the oldest indexed point), created, changed, unchanged, deleted
    type: str | None = None
    size: int | None = None
    mtime_ns: int | None = None


@dataclass
class FoundPath:
    name: str  # the VM (restore point name)
    path: str
    versions: list[Version] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "versions": [v.__dict__ for v in self.versions]}


def find(
    repository: Repository, catalog: Catalog, pattern: str, name: str | None = None
) -> tuple[list[FoundPath], dict[str, list[str]]]:
    """Paths matching `pattern` in the indexed restore points, each with its history: in which points
    it exists and whether it was created, changed or deleted there (against the indexed point of
    the same name before; "present" in the oldest indexed point, where that is not known). Also
    {name: [indexed restore point ids, oldest first]}.

    A pattern without "/" matches the last component (as `find -name`); one with "/" the whole
    guest path (as `find -path`: `*` also matches "/"). Restore points that no longer exist are
    dropped from the index first.
    """
    files = FileIndexCatalog(catalog)
    existing = {p.id for p in repository.list_restore_points()}
    files.forget_points(repository.id, existing)
    points = files.indexed_points(repository.id, name)
    by_name: dict[str, list[tuple[str, str]]] = {}
    for point_id, (point_name, created) in points.items():
        by_name.setdefault(point_name, []).append((created, point_id))
    order = {n: [pid for _c, pid in sorted(v)] for n, v in by_name.items()}
    created_of = {pid: c for pid, (_n, c) in points.items()}
    by_name_pattern = "/" not in pattern
    hits = files.find(repository.id, pattern, by_name=by_name_pattern, name=name)
    found: dict[tuple[str, str], dict[str, tuple[str, int, int]]] = {}
    for hit in hits:
        found.setdefault((hit.point_name, hit.guest_path), {})[hit.restore_point] = (hit.type, hit.size, hit.mtime_ns)
    result = []
    for (point_name, path), present in sorted(found.items()):
        entry = FoundPath(point_name, path)
        before: tuple[str, int, int] | None = None
        for number, point_id in enumerate(order.get(point_name, [])):
            now = present.get(point_id)
            if now is None:
                if before is not None:
                    entry.versions.append(Version(point_id, created_of[point_id], "deleted"))
                before = None
                continue
            if before is None:
                change = "present" if number == 0 else "created"
            else:
                change = "unchanged" if now == before else "changed"
            entry.versions.append(Version(point_id, created_of[point_id], change, *now))
            before = now
        result.append(entry)
    return result, order
