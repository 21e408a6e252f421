"""A replica on disk: a directory of qcow2 chains and one JSON record that names its restore points.

    NAME-replica/                    0700
      replica.json                   the record; replaced atomically; the only commit point of a cycle
      lock                           flock(2) of the one writer (a replication cycle, a failover)
      disks/DEVICE.base.qcow2        the oldest kept state of each disk
      disks/DEVICE.POINT.qcow2       one overlay per later restore point: the blocks that changed in
                                     that cycle, backing = the previous point's file (relative name)
      failover/...                   owned by failover: overlays on a chosen point

The record (format 1)::

    {"format": 1, "id": random hex, "vm": NAME,
     "source": {"argv": [...QEMU command line...], "libvirt_xml": str|null,
                "disks": [{"device", "virtual_size", "filename"}]},
     "state": "ready" | "failed-over" | "permanent",
     "points": [{"id", "time", "consistency", "files": {DEVICE: "disks/..."},
                 "sent_bytes", "cbt", "notes", "bitmap"}],          # oldest first
     "failover": null | {...}}

A point's files are the top of a qcow2 chain that reads as the VM's disk at that point's instant
(`chain_files`). The oldest point's files are the bases. A cycle writes a new overlay on top of the
latest point's files, then commits by saving the record with the new point; an overlay the record
does not name is a cycle that did not finish and `remove_unfinished` deletes it. Retention drops
the oldest points from the record first (one atomic save), then merges each new oldest overlay into
its base (`qemu-img commit` keeps the overlay's data, so base + overlay reads the same throughout),
points the next overlay at the base (`rebase -u`), saves, and only then deletes the merged overlay:
every step, interrupted, leaves every recorded point readable, and the merge is finished by the
next writer (`fold`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from surepoint.replica import images
from surepoint.replica.errors import (
    NotAReplica,
    ReplicaDamaged,
    ReplicaError,
    ReplicaLocked,
    ReplicaNotFound,
    ReplicaOfAnotherVm,
    ReplicaPointNotFound,
)
from surepoint.timestamps import parse_utc

FORMAT = 1
RECORD = "replica.json"
LOCK = "lock"
DISKS = "disks"
FAILOVER = "failover"
SUFFIX = "-replica"
DEFAULT_KEEP = 7

READY = "ready"
FAILED_OVER = "failed-over"
PERMANENT = "permanent"
STATES = (READY, FAILED_OVER, PERMANENT)


def default_name(vm: str) -> str:
    """The replica directory's name for a VM: NAME-replica."""
    return f"{vm}{SUFFIX}"


def file_stem(device: str) -> str:
    """A device name made safe as a file name (node names may hold '#' or '/')."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", device).lstrip(".")
    return stem or "disk"


def new_point_id() -> str:
    return secrets.token_hex(4)


@dataclass
class SourceDisk:
    """One disk of the replicated VM as its QEMU showed it."""

    device: str
    virtual_size: int
    filename: str = ""


@dataclass
class SourceConfig:
    """What is needed to run the replica like the source: its command line, its libvirt XML, its disks."""

    argv: list[str] = field(default_factory=list)
    libvirt_xml: str | None = None
    disks: list[SourceDisk] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceConfig:
        return cls(
            argv=list(data.get("argv") or []),
            libvirt_xml=data.get("libvirt_xml"),
            disks=[SourceDisk(d["device"], int(d["virtual_size"]), d.get("filename") or "") for d in data["disks"]],
        )

    def devices(self) -> list[str]:
        return [d.device for d in self.disks]


@dataclass
class ReplicaPoint:
    """One kept state of the replica: when its view was taken, how consistent it is, its chain tops."""

    id: str
    time: str  # the instant of the point-in-time view, UTC (surepoint.timestamps)
    consistency: str  # crash | filesystem | application
    files: dict[str, str]  # device -> path of its chain top, relative to the replica directory
    sent_bytes: int = 0  # bytes of disk data written into this point's overlays
    cbt: str = ""  # how the changes were found: dirty bitmap, checksum compare, full
    notes: list[str] = field(default_factory=list)
    bitmap: str | None = None  # the source's dirty bitmap that tracks writes since this point's instant

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaPoint:
        return cls(
            id=str(data["id"]),
            time=str(data["time"]),
            consistency=str(data.get("consistency", "crash")),
            files={str(k): str(v) for k, v in data["files"].items()},
            sent_bytes=int(data.get("sent_bytes", 0)),
            cbt=str(data.get("cbt", "")),
            notes=[str(n) for n in data.get("notes", [])],
            bitmap=data.get("bitmap"),
        )


class ReplicaDir:
    """A replica directory: its record in memory, and the operations that keep it consistent on disk.

    Only the holder of `lock()` may change it. Readers (a listing, a failover picking a point) may
    open it at any time: the record they read names files that exist.
    """

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = os.path.abspath(path)
        self.vm: str = data["vm"]
        self.id: str = str(data.get("id") or "")  # names the source's dirty bitmaps of this replica
        self.source = SourceConfig.from_json(data["source"])
        self.state: str = data.get("state", READY)
        self.points: list[ReplicaPoint] = [ReplicaPoint.from_json(p) for p in data.get("points", [])]
        self.failover: dict[str, Any] | None = data.get("failover")
        self.extra: dict[str, Any] = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
        self._lock_fd: int | None = None

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def exists(cls, path: str) -> bool:
        return os.path.exists(os.path.join(path, RECORD))

    @classmethod
    def open(cls, path: str) -> ReplicaDir:
        """The replica at `path`; ReplicaNotFound, or NotAReplica for a record this program cannot read."""
        record = os.path.join(path, RECORD)
        try:
            with open(record) as f:
                data = json.load(f)
        except FileNotFoundError:
            if os.path.isdir(path) and os.listdir(path):
                raise NotAReplica(f"{path} is not a replica (it has no {RECORD})") from None
            raise ReplicaNotFound(f"no replica at {path}") from None
        except (OSError, ValueError) as exc:
            raise NotAReplica(f"{record} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise NotAReplica(f"{record} is not a replica record of format {FORMAT}")
        try:
            replica = cls(path, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise NotAReplica(f"{record} is malformed: {exc}") from None
        if replica.state not in STATES:
            raise NotAReplica(f"{record} has an unknown state {replica.state!r}")
        return replica

    @classmethod
    def create(cls, path: str, vm: str, source: SourceConfig) -> ReplicaDir:
        """A new, empty replica of `vm` at `path` (record saved, no points); or the one already there
        when it replicates the same VM (its source configuration updated in memory, not saved).

        ReplicaOfAnotherVm when the path holds another VM's replica; NotAReplica when it holds
        other files.
        """
        if cls.exists(path):
            replica = cls.open(path)
            if replica.vm != vm:
                raise ReplicaOfAnotherVm(f"{path} is a replica of VM {replica.vm!r}, not of {vm!r}")
            replica.source = source
            return replica
        if os.path.isdir(path) and [n for n in os.listdir(path) if n not in (LOCK, DISKS)]:
            raise NotAReplica(f"{path} is not empty and is not a replica")
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        os.makedirs(os.path.join(path, DISKS), mode=0o700, exist_ok=True)
        data = {
            "id": secrets.token_hex(8),
            "vm": vm,
            "source": asdict(source),
            "state": READY,
            "points": [],
            "failover": None,
        }
        replica = cls(path, data)
        replica.save()
        return replica

    # -- the record -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "vm": self.vm,
            "source": asdict(self.source),
            "state": self.state,
            "points": [asdict(p) for p in self.points],
            "failover": self.failover,
            **self.extra,
        }

    def save(self) -> None:
        """Replace the record atomically: temporary file, fsync, rename, fsync of the directory."""
        record = os.path.join(self.path, RECORD)
        tmp = f"{record}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, record)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path)

    # -- locking ----------------------------------------------------------------------------

    def lock(self, wait: bool = False) -> ReplicaDir:
        """Become the one writer (flock on PATH/lock, released by unlock() or when the process dies).

        ReplicaLocked when another process holds it and `wait` is false. Usable as a context manager.
        """
        if self._lock_fd is not None:
            return self
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise ReplicaLocked(f"the replica at {self.path} is in use by another process") from None
        self._lock_fd = fd
        self.reload()  # what the previous writer committed
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def __enter__(self) -> ReplicaDir:
        return self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def reload(self) -> None:
        fresh = ReplicaDir.open(self.path)
        if fresh.vm != self.vm:
            raise ReplicaOfAnotherVm(f"{self.path} is now a replica of VM {fresh.vm!r}")
        self.id, self.source, self.state, self.points = fresh.id, fresh.source, fresh.state, fresh.points
        self.failover, self.extra = fresh.failover, fresh.extra

    # -- points -----------------------------------------------------------------------------

    @property
    def latest(self) -> ReplicaPoint | None:
        return self.points[-1] if self.points else None

    def point(self, ref: str = "latest") -> ReplicaPoint:
        """A point by id, unambiguous id prefix, `latest`, or a time (ISO 8601: the latest point taken
        at or before it)."""
        if not self.points:
            raise ReplicaPointNotFound(f"the replica of {self.vm} has no restore point yet")
        if ref in ("latest", ""):
            return self.points[-1]
        exact = [p for p in self.points if p.id == ref]
        if exact:
            return exact[0]
        prefixed = [p for p in self.points if p.id.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise ReplicaPointNotFound(f"{ref!r} matches {len(prefixed)} points of the replica of {self.vm}")
        when = _parse_time(ref)
        if when is not None:
            before = [p for p in self.points if parse_utc(p.time) <= when]
            if before:
                return before[-1]
            raise ReplicaPointNotFound(f"the replica of {self.vm} has no point at or before {ref}")
        raise ReplicaPointNotFound(f"the replica of {self.vm} has no point {ref!r}")

    def chain_files(self, point: ReplicaPoint | str, device: str) -> str:
        """The absolute path of the qcow2 to open (read-only, or as a backing file) for `device` at `point`."""
        p = self.point(point) if isinstance(point, str) else point
        try:
            rel = p.files[device]
        except KeyError:
            raise ReplicaPointNotFound(f"point {p.id} of the replica of {self.vm} has no disk {device!r}") from None
        path = os.path.join(self.path, rel)
        if not os.path.exists(path):
            raise ReplicaDamaged(f"{path} is missing: point {p.id} of the replica of {self.vm} cannot be read")
        return path

    def devices(self) -> list[str]:
        return self.source.devices()

    # -- writing (lock held) ------------------------------------------------------------------

    def disk_path(self, device: str, point_id: str | None) -> str:
        """Where a disk's base (point_id None) or a point's overlay lives, relative to the directory."""
        return os.path.join(DISKS, f"{file_stem(device)}.{point_id or 'base'}.qcow2")

    def chain(self, device: str, top: str) -> list[str]:
        """Relative paths of `top`'s backing chain, base first, top last."""
        base = self.disk_path(device, None)
        chain = [top]
        while chain[-1] != base:
            if len(chain) > 10_000:
                raise ReplicaDamaged(f"the backing chain of {top} does not end in {base}")
            backing = images.info(os.path.join(self.path, chain[-1])).get("backing-filename")
            if not backing:
                raise ReplicaDamaged(f"{chain[-1]} has no backing file but is not the base of {device}")
            chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), backing)))
        return chain[::-1]

    def referenced(self) -> set[str]:
        """Relative paths of every disk file a recorded point reads (its whole chain down to the base)."""
        needed: set[str] = set()
        # newest first: an older point's top is mostly in a newer chain already, and a file that is in
        # `needed` brought its whole chain with it. A disk the VM no longer has is only in older points:
        # its chain is walked from their tops.
        for p in reversed(self.points):
            for device, top in p.files.items():
                if top not in needed:
                    needed.update(self.chain(device, top))
        return needed

    def remove_unfinished(self) -> list[str]:
        """Delete disk files no recorded point reads (a cycle that died before its commit, an overlay
        whose merge was interrupted after it left the chain). Lock held."""
        self._require_lock()
        disks = os.path.join(self.path, DISKS)
        needed = self.referenced()
        removed = []
        for name in sorted(os.listdir(disks)) if os.path.isdir(disks) else []:
            rel = os.path.join(DISKS, name)
            if rel not in needed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, rel))
                removed.append(rel)
        if removed:
            _fsync_dir(disks)
        return removed

    def add_point(self, point: ReplicaPoint) -> None:
        """Commit a finished cycle: its files must exist (and be synced) already. Lock held."""
        self._require_lock()
        for device, rel in point.files.items():
            if not os.path.exists(os.path.join(self.path, rel)):
                raise ReplicaDamaged(f"{rel} of {device} is missing: the point cannot be committed")
        self.points.append(point)
        try:
            self.save()
        except BaseException:
            self.points.pop()
            raise

    def forget(self, point_ids: list[str]) -> list[str]:
        """Drop points from the record, then fold their overlays into the chain. Lock held.

        Forgetting the latest point is allowed: the next cycle then finds its changes-tracking
        bitmap retired (it belonged to the forgotten point) and compares checksums instead.
        """
        self._require_lock()
        drop = set(point_ids)
        unknown = drop - {p.id for p in self.points}
        if unknown:
            raise ReplicaPointNotFound(f"the replica of {self.vm} has no point {', '.join(sorted(unknown))}")
        self.points = [p for p in self.points if p.id not in drop]
        self.save()
        self.fold()
        self.remove_unfinished()  # a forgotten latest point's overlays
        return sorted(drop)

    def apply_retention(self, keep: int) -> list[str]:
        """Keep the newest `keep` points (at least one); returns the ids dropped. Lock held."""
        self._require_lock()
        keep = max(1, keep)
        dropped = [p.id for p in self.points[:-keep]]
        if dropped:
            self.points = self.points[-keep:]
            self.save()
        self.fold()
        return dropped

    def fold(self) -> None:
        """Leave in each disk's chain only the files of recorded points, the oldest of them the base.

        Idempotent: it finishes a fold an interruption cut short. Lock held. Per disk, bottom up:
        while the base is not the oldest point's file, the overlay right above it is merged into it
        (`qemu-img commit -d`: base + overlay reads the same during the copy), the next overlay is
        pointed at the base (`rebase -u`: the base now reads as the merged overlay did), the record
        renames the merged file to the base, and the overlay is deleted. An overlay of a forgotten
        point in the middle is taken out by a safe `qemu-img rebase` of the overlay above it onto
        the one below (it copies just the clusters the forgotten overlay held; the backing pointer
        changes last), then deleted.
        """
        self._require_lock()
        latest = self.latest
        if latest is None:
            return
        for device, top in latest.files.items():
            base = self.disk_path(device, None)
            chain = self.chain(device, top)
            recorded = {p.files.get(device) for p in self.points}
            while base not in recorded and len(chain) > 1:
                overlay = chain[1]
                images.commit(os.path.join(self.path, overlay))
                if len(chain) > 2:
                    images.rebase_unsafe(os.path.join(self.path, chain[2]), os.path.basename(base))
                changed = False
                for p in self.points:
                    if p.files.get(device) == overlay:
                        p.files[device] = base
                        changed = True
                if changed:
                    self.save()
                    recorded = {p.files.get(device) for p in self.points}
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, overlay))
                chain = [base, *chain[2:]]
            for i in range(len(chain) - 2, 0, -1):  # forgotten points between kept ones
                if chain[i] in recorded:
                    continue
                images.rebase_safe(os.path.join(self.path, chain[i + 1]), os.path.basename(chain[i - 1]))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, chain[i]))
                del chain[i]
        _fsync_dir(os.path.join(self.path, DISKS))

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise ReplicaLocked(f"the replica at {self.path} must be locked to be changed")

    # -- sizes --------------------------------------------------------------------------------

    def point_bytes(self, point: ReplicaPoint) -> int:
        """Bytes of disk data the point's own files hold (for the base: the whole oldest state)."""
        total = 0
        for rel in point.files.values():
            with contextlib.suppress(ReplicaError):
                total += images.allocated_bytes(os.path.join(self.path, rel))
        return total


_KNOWN_KEYS = {"format", "id", "vm", "source", "state", "points", "failover"}


def _parse_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.astimezone()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
