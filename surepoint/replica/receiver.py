"""The writing end of a replication cycle, on the replica's machine: one session holds the replica's
lock, writes one new restore point's overlays and commits it.

The same object serves a local target in-process and an ssh:// target behind `surepoint replica
receive` (surepoint/replica/protocol.py). Calls, in order: `open` (create or check the replica,
finish what a dead cycle left), then per cycle `begin`, any number of `checksums`/`write`/`zero`,
and `commit` or `abort`; `close` at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from surepoint import storage
from surepoint.errors import InvalidArgument, SurepointError
from surepoint.replica import images, libvirt_target
from surepoint.replica.errors import ReplicaStateError, ReplicaWriteError
from surepoint.replica.layout import (
    DEFAULT_KEEP,
    READY,
    ReplicaDir,
    ReplicaPoint,
    SourceConfig,
)
from surepoint.replica.storage_daemon import StorageDaemon
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.vm.errors import NbdError

CHECKSUM_BYTES = 16


def block_digests(data: bytes, block: int) -> bytes:
    """The concatenated BLAKE2b-128 digests of each `block`-sized piece of `data`."""
    view = memoryview(data)
    return b"".join(
        hashlib.blake2b(view[i : i + block], digest_size=CHECKSUM_BYTES).digest() for i in range(0, len(data), block)
    )


class ReplicaSession:
    """One writer of one replica directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.replica: ReplicaDir | None = None
        self.daemon: StorageDaemon | None = None
        self.point_id: str | None = None
        self.files: dict[str, str] = {}
        self.written = 0
        self.notes: list[str] = []

    # -- opening --------------------------------------------------------------------------

    def open(self, vm: str, source: dict[str, Any]) -> dict[str, Any]:
        """Create or open the replica of `vm`, take its lock, clean up after a dead cycle.

        Returns what the sender needs: the replica's id, and its latest point (id, bitmap, disks).
        """
        replica = ReplicaDir.create(self.path, vm, SourceConfig.from_json(source))
        replica.lock()
        self.replica = replica
        try:
            if replica.state != READY:
                raise ReplicaStateError(
                    f"the replica of {vm} at {self.path} is {replica.state}: it takes no replication until that ends"
                )
            removed = replica.remove_unfinished()
            if removed:
                self.notes.append(f"removed what an unfinished cycle left: {', '.join(removed)}")
            replica.fold()
            replica.remove_unfinished()
            replica.source = SourceConfig.from_json(source)
            replica.save()
        except BaseException:
            self.close()
            raise
        latest = replica.latest
        return {
            "replica_id": replica.id,
            "path": replica.path,
            "latest": asdict(latest) if latest else None,
            "sizes": self._latest_sizes(),
            "notes": self.notes,
        }

    def _latest_sizes(self) -> dict[str, int]:
        assert self.replica is not None
        latest = self.replica.latest
        if latest is None:
            return {}
        sizes = {}
        for device in latest.files:
            sizes[device] = int(images.info(self.replica.chain_files(latest, device)).get("virtual-size", 0))
        return sizes

    # -- a cycle --------------------------------------------------------------------------

    def begin(self, point_id: str, sizes: dict[str, int]) -> None:
        """New files for the point: overlays on the latest point's files (bases for a first cycle or a
        disk the replica does not have yet), served by a storage daemon."""
        replica = self._replica()
        if self.daemon is not None:
            raise ReplicaWriteError("a cycle is already running in this session")
        latest = replica.latest
        self.point_id = point_id
        self.files = {}
        self.written = 0
        try:
            for device, size in sizes.items():
                below = latest.files.get(device) if latest else None
                rel = replica.disk_path(device, point_id if below else None)
                path = os.path.join(replica.path, rel)
                images.create(path, size, backing=os.path.basename(below) if below else None)
                self.files[device] = rel
            self.daemon = StorageDaemon({device: os.path.join(replica.path, rel) for device, rel in self.files.items()})
        except BaseException:
            self.abort()
            raise

    def seed(self, device: str, raw_image: str) -> None:
        """Fill a first cycle's base from a raw image (a restore point restored at this site)."""
        replica = self._replica()
        if self.daemon is None or replica.latest is not None:
            raise ReplicaWriteError("seeding needs a first cycle in progress")
        self.daemon.stop()
        self.daemon = None
        path = os.path.join(replica.path, self.files[device])
        os.unlink(path)
        images.convert_from_raw(raw_image, path)
        self.daemon = StorageDaemon({d: os.path.join(replica.path, rel) for d, rel in self.files.items()})

    def checksums(self, device: str, offset: int, length: int, block: int) -> bytes:
        """Digests of the replica's current blocks (the latest point's, plus what this cycle wrote)."""
        try:
            data = self._daemon().client(device).read(offset, length)
        except NbdError as exc:
            raise ReplicaWriteError(f"reading {device} of the replica: {exc}") from None
        return block_digests(data, block)

    def write(self, device: str, offset: int, data: bytes) -> None:
        try:
            self._daemon().client(device).write(offset, data)
        except NbdError as exc:
            raise ReplicaWriteError(f"writing {device} of the replica: {_reason(exc)}") from None
        self.written += len(data)

    def zero(self, device: str, offset: int, length: int) -> None:
        try:
            self._daemon().client(device).write_zeroes(offset, length)
        except NbdError as exc:
            raise ReplicaWriteError(f"writing {device} of the replica: {_reason(exc)}") from None

    def commit(self, point: dict[str, Any], keep: int = DEFAULT_KEEP) -> dict[str, Any]:
        """Make the cycle's files durable and record the point; then retention and the libvirt domain."""
        replica = self._replica()
        daemon = self._daemon()
        daemon.flush()
        daemon.stop()
        self.daemon = None
        for rel in self.files.values():
            _fsync(os.path.join(replica.path, rel))
        record = ReplicaPoint.from_json({**point, "id": self.point_id, "files": self.files, "sent_bytes": self.written})
        replica.add_point(record)
        self.point_id = None
        notes: list[str] = []
        dropped: list[str] = []
        try:
            dropped = replica.apply_retention(keep)
        except SurepointError as exc:  # the point is committed; the fold is finished next time
            notes.append(f"retention left for the next cycle: {exc}")
        if replica.source.libvirt_xml:
            notes.append(libvirt_target.define(replica))
        return {"point": asdict(record), "dropped": dropped, "notes": notes}

    def abort(self) -> None:
        """Forget the cycle: its files go; the latest point stays as it was."""
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if self.replica is not None and self.replica.locked:
            with contextlib.suppress(SurepointError, OSError):
                self.replica.remove_unfinished()
        self.point_id = None
        self.files = {}

    def close(self) -> None:
        self.abort()
        if self.replica is not None:
            self.replica.unlock()

    # -- helpers --------------------------------------------------------------------------

    def _replica(self) -> ReplicaDir:
        if self.replica is None:
            raise ReplicaWriteError("the replica is not open")
        return self.replica

    def _daemon(self) -> StorageDaemon:
        if self.daemon is None:
            raise ReplicaWriteError("no cycle is running")
        return self.daemon

    def seed_from(
        self, repository: str, point: str, devices: list[str], passphrase: Callable[[], str] | None = None
    ) -> dict[str, Any]:
        """Fill a first cycle's bases from a restore point of a repository at this site (the disks of
        `devices` it has). Returns the restore point's id, its dirty bitmap, the disks seeded."""
        repo = Repository.open(storage.open(repository), passphrase or passphrase_from_env)
        rp = repo.resolve(point)
        seeded = []
        workdir = os.path.join(self._replica().path, "disks")
        for number, disk in enumerate(rp.disks):
            if disk.name in devices and disk.name in self.files:
                raw = restore_to_raw(repo, rp, number, workdir)
                try:
                    self.seed(disk.name, raw)
                finally:
                    os.unlink(raw)
                seeded.append(disk.name)
        return {"restore_point": rp.id, "bitmap": rp.metadata.get("vm", {}).get("bitmap"), "seeded": seeded}


def passphrase_from_env() -> str:
    """A repository passphrase from SUREPOINT_PASSPHRASE or the file SUREPOINT_PASSPHRASE_FILE names."""
    if os.environ.get("SUREPOINT_PASSPHRASE"):
        return os.environ["SUREPOINT_PASSPHRASE"]
    path = os.environ.get("SUREPOINT_PASSPHRASE_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().rstrip("\n")
        except OSError as exc:
            raise InvalidArgument(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    raise InvalidArgument("the repository needs a passphrase: set SUREPOINT_PASSPHRASE or SUREPOINT_PASSPHRASE_FILE")


def restore_to_raw(repository: Any, point: Any, disk_number: int, workdir: str) -> str:
    """A restore point's disk as a sparse raw file in `workdir` (for seeding); the caller deletes it."""
    fd, path = tempfile.mkstemp(prefix="seed-", suffix=".raw", dir=workdir)
    os.close(fd)
    os.unlink(path)
    try:
        restore_disk(repository, point, disk_number, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def _reason(exc: NbdError) -> str:
    if getattr(exc, "errno", None) == 28:
        return "no space left on the replica's disk"
    return str(exc)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
