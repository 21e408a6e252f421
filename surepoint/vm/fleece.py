"""A point-in-time view of a running VM's disks, readable over NBD while the guest keeps writing.

How (QEMU 7.2 "image fleecing"): for each disk, a temporary qcow2 image whose backing is the live
node, and a `blockdev-backup` job with sync=none from the live node into it. The job copies old data
into the temporary image just before the guest overwrites it, so the temporary node reads as the
disk was at the start of the job. All jobs start in ONE QMP `transaction`, together with the dirty
bitmap actions, so every disk and bitmap share one instant. Each temporary node is then exported
read-only by QEMU's NBD server on a unix socket.

Why not copy-before-write + snapshot-access (both exist in 7.2): the filter has to sit between the
guest device and its disk, and 7.2 has no way to insert a node above a running device's disk
(no blockdev-replace); the backup job inserts its own copy-before-write filter, which is the same
mechanism set up for us.

Dirty bitmaps: with `bitmap_name` (the bitmap that tracked writes since the last backup), a
disabled copy of it is made on the temporary node inside the transaction and exported as
`qemu:dirty-bitmap:<bitmap_name>`; the live bitmap goes on tracking. With `new_bitmap`, a bitmap
starting at this instant is added to each live disk (persistent when the disk's format is qcow2,
which alone can store bitmaps; otherwise in memory only, lost when QEMU exits). If the with-block
raises, the new bitmap is removed again (the old one still covers everything since the last good
backup); `retire_base_bitmap=True` removes the old one after a with-block that succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from surepoint.interrupt import checkpoint
from surepoint.vm.errors import FleeceError, QmpError, VmError
from surepoint.vm.nbd import NbdDiskSource
from surepoint.vm.qmp import QmpConnection

Hook = Callable[[], object]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewDisk:
    """One disk of a view: the live node it shows, and where to read it."""

    disk: str
    node: str
    size: int
    export: str
    fleece_node: str
    job_id: str
    image: str
    bitmap: str | None


class PointInTimeView:
    """Context manager: a consistent instant of `disks`, exported over NBD until exit.

    disks: node names, device names or qdev ids of the VM's disks.
    freeze/thaw: hooks run just around the transaction (e.g. a GuestAgent's fsfreeze_freeze and
    fsfreeze_thaw) so the instant is filesystem-consistent; thaw runs even if the transaction fails.
    If freeze raises, the view is not made unless require_freeze=False (then crash-consistent).
    """

    def __init__(
        self,
        qmp: QmpConnection,
        disks: Sequence[str],
        *,
        bitmap_name: str | None = None,
        new_bitmap: str | None = None,
        persistent: bool | None = None,
        granularity: int | None = None,
        freeze: Hook | None = None,
        thaw: Hook | None = None,
        require_freeze: bool = True,
        retire_base_bitmap: bool = False,
        workdir: str | None = None,
        socket_path: str | None = None,
    ) -> None:
        if not disks:
            raise FleeceError("a point-in-time view needs at least one disk")
        if bitmap_name is not None and bitmap_name == new_bitmap:
            raise FleeceError("new_bitmap must differ from bitmap_name")
        self.qmp = qmp
        self.requested = list(disks)
        self.bitmap_name = bitmap_name
        self.new_bitmap = new_bitmap
        self.persistent = persistent
        self.granularity = granularity
        self.freeze = freeze
        self.thaw = thaw
        self.require_freeze = require_freeze
        self.retire_base_bitmap = retire_base_bitmap
        self._workdir_arg = workdir
        self._socket_arg = socket_path
        self.tag = secrets.token_hex(4)
        self.disks: list[ViewDisk] = []
        self.socket_path = ""
        self.quiesced = False
        self.freeze_error: BaseException | None = None
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._new_bitmap_nodes: list[str] = []
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> PointInTimeView:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close(success=exc_type is None)

    def start(self) -> None:
        """Make the view: temp images, one transaction, NBD exports. Undoes what it did on error."""
        if self._started:
            raise FleeceError("this view was already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close(success=False)
            raise

    def close(self, success: bool = True) -> None:
        """Tear everything down (exports, server, jobs, nodes, files); safe to call twice.

        On success=False the bitmap made by this view is removed too.
        """
        errors: list[str] = []
        if not success:
            for node in self._new_bitmap_nodes:
                self._try(
                    errors,
                    f"remove bitmap {self.new_bitmap} on {node}",
                    lambda n=node: self.qmp.execute("block-dirty-bitmap-remove", node=n, name=self.new_bitmap),
                )
            self._new_bitmap_nodes = []
        while self._undo:
            what, action = self._undo.pop()
            self._try(errors, what, action)
        if success and self.retire_base_bitmap and self.bitmap_name and self.disks:
            for disk in self.disks:
                self._try(
                    errors,
                    f"remove bitmap {self.bitmap_name} on {disk.node}",
                    lambda n=disk.node: self.qmp.execute("block-dirty-bitmap-remove", node=n, name=self.bitmap_name),
                )
            self.disks = []
        if errors:
            message = "point-in-time view teardown failed: " + "; ".join(errors)
            if success:
                raise FleeceError(message)
            log.warning("%s", message)  # an error is already on its way up

    @staticmethod
    def _try(errors: list[str], what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except (VmError, OSError) as exc:
            errors.append(f"{what}: {exc}")

    # -- setup ----------------------------------------------------------------------------

    def _start(self) -> None:
        devices = [self.qmp.resolve_node(d) for d in self.requested]
        nodes = {n["node-name"]: n for n in self.qmp.query_named_block_nodes()}
        if len({d.node_name for d in devices}) != len(devices):
            raise FleeceError("the same disk is named twice")

        workdir = self._workdir_arg or tempfile.mkdtemp(prefix="surepoint-fleece-")
        if not self._workdir_arg:
            self._undo.append(("remove work dir", lambda: shutil.rmtree(workdir, ignore_errors=True)))
        self.socket_path = self._socket_arg or os.path.join(workdir, "nbd.sock")

        actions: list[dict[str, Any]] = []
        for index, dev in enumerate(devices):
            bitmaps = {b["name"]: b for b in nodes.get(dev.node_name, {}).get("dirty-bitmaps", [])}
            if self.bitmap_name and self.bitmap_name not in bitmaps:
                raise FleeceError(
                    f"disk {dev.node_name!r} has no dirty bitmap {self.bitmap_name!r}: changes since the "
                    "last backup are unknown, a full backup is needed"
                )
            if self.new_bitmap and self.new_bitmap in bitmaps:
                raise FleeceError(f"disk {dev.node_name!r} already has a dirty bitmap {self.new_bitmap!r}")
            disk = ViewDisk(
                disk=self.requested[index],
                node=dev.node_name,
                size=dev.size,
                export=self.requested[index],
                fleece_node=f"sp-fleece-{self.tag}-{index}",
                job_id=f"sp-backup-{self.tag}-{index}",
                image=os.path.join(workdir, f"fleece-{self.tag}-{index}.qcow2"),
                bitmap=self.bitmap_name,
            )
            self._add_fleece_node(disk)
            self.disks.append(disk)
            actions.append(
                _action(
                    "blockdev-backup", device=disk.node, target=disk.fleece_node, sync="none", **{"job-id": disk.job_id}
                )
            )
            if self.bitmap_name:
                granularity = int(bitmaps[self.bitmap_name].get("granularity", 65536))
                actions.append(
                    _action(
                        "block-dirty-bitmap-add",
                        node=disk.fleece_node,
                        name=self.bitmap_name,
                        granularity=granularity,
                        persistent=False,
                        disabled=True,
                    )
                )
                actions.append(
                    _action(
                        "block-dirty-bitmap-merge",
                        node=disk.fleece_node,
                        target=self.bitmap_name,
                        bitmaps=[{"node": disk.node, "name": self.bitmap_name}],
                    )
                )
            if self.new_bitmap:
                persistent = self.persistent if self.persistent is not None else dev.driver == "qcow2"
                args: dict[str, Any] = {"node": disk.node, "name": self.new_bitmap, "persistent": persistent}
                if self.granularity:
                    args["granularity"] = self.granularity
                actions.append(_action("block-dirty-bitmap-add", **args))

        self._transaction(actions)
        self._export()

    def _add_fleece_node(self, disk: ViewDisk) -> None:
        """A temporary qcow2 image of the disk's size whose backing is the live node."""
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", disk.image, str(disk.size)],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise FleeceError("qemu-img is not installed (package qemu-utils)") from None
        except subprocess.CalledProcessError as exc:
            raise FleeceError(f"qemu-img create {disk.image}: {exc.stderr.strip()}") from None
        self._undo.append((f"delete {disk.image}", lambda: os.unlink(disk.image)))
        self.qmp.execute_args(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": disk.fleece_node,
                "file": {"driver": "file", "filename": disk.image},
                "backing": disk.node,
                "discard": "unmap",
            },
        )
        self._undo.append(
            (f"blockdev-del {disk.fleece_node}", lambda: self.qmp.execute("blockdev-del", node_name=disk.fleece_node))
        )

    def _transaction(self, actions: list[dict[str, Any]]) -> None:
        """Freeze, run the one transaction, thaw: the instant of the view."""
        froze = False
        if self.freeze is not None:
            try:
                self.freeze()
                froze = True
            except Exception as exc:  # the freeze hook tried to thaw already
                self.freeze_error = exc
                if self.require_freeze:
                    raise FleeceError(f"could not quiesce the guest: {exc}") from exc
        try:
            checkpoint("vm-frozen")
            self.qmp.execute("transaction", actions=actions)
        finally:  # an error or an interruption in between: the guest is thawed all the same
            if froze and self.thaw is not None:
                self.thaw()
        self.quiesced = froze
        if self.new_bitmap:
            self._new_bitmap_nodes = [d.node for d in self.disks]
        for disk in self.disks:
            self._undo.append((f"cancel job {disk.job_id}", lambda d=disk: self._cancel_job(d.job_id)))

    def _export(self) -> None:
        self.qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": self.socket_path}})
        self._undo.append(("nbd-server-stop", lambda: self.qmp.execute("nbd-server-stop")))
        for disk in self.disks:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": f"sp-export-{self.tag}-{disk.fleece_node}",
                "node-name": disk.fleece_node,
                "name": disk.export,
                "writable": False,
            }
            if disk.bitmap:
                args["bitmaps"] = [disk.bitmap]
            self.qmp.execute_args("block-export-add", args)
            self._undo.append((f"remove export {disk.export}", lambda i=args["id"]: self._delete_export(i)))

    # -- teardown helpers -----------------------------------------------------------------

    def _delete_export(self, export_id: str, timeout: float = 30.0) -> None:
        self.qmp.execute("block-export-del", id=export_id, mode="hard")
        _wait_until(
            lambda: all(e.get("id") != export_id for e in self.qmp.execute("query-block-exports")),
            timeout,
            f"export {export_id} to go away",
        )

    def _cancel_job(self, job_id: str, timeout: float = 30.0) -> None:
        with contextlib.suppress(QmpError):  # a job that already ended cannot be cancelled
            self.qmp.execute("block-job-cancel", device=job_id, force=True)
        _wait_until(
            lambda: all(j.get("device") != job_id for j in self.qmp.query_block_jobs()), timeout, f"job {job_id} to end"
        )

    # -- reading --------------------------------------------------------------------------

    def disk(self, name: str) -> ViewDisk:
        for disk in self.disks:
            if name in (disk.disk, disk.node, disk.export):
                return disk
        raise FleeceError(f"no disk {name!r} in this view")

    def source(self, name: str, timeout: float = 60.0) -> NbdDiskSource:
        """An NBD DiskSource reading this disk as it was at the view's instant."""
        disk = self.disk(name)
        return NbdDiskSource(self.socket_path, disk.export, name=disk.disk, bitmap=disk.bitmap, timeout=timeout)


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        if time.monotonic() > deadline:
            raise FleeceError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _image_of(node: dict) -> str | None:
    """The image file of a qcow2 node (its `file` is a json: pseudo-filename when it has a backing node)."""
    name = node.get("file") or ""
    if name.startswith("json:"):
        with contextlib.suppress(ValueError, AttributeError):
            return json.loads(name[5:]).get("file", {}).get("filename")
        return None
    return name or None


def remove_dead_views(qmp: QmpConnection) -> list[str]:
    """Take down what a job that died (killed, host crash) left of its point-in-time view in QEMU: NBD
    exports, backup jobs (whose copy-before-write filter slows every guest write), temporary nodes and
    their images, the NBD server. QMP takes one client at a time and a job holds its connection from
    start to end, so a view still there when a job starts is a dead job's. Returns what was removed."""
    removed: list[str] = []
    workdirs: set[str] = set()
    for export in qmp.execute("query-block-exports"):
        export_id = export.get("id", "")
        if export_id.startswith("sp-export-"):
            with contextlib.suppress(QmpError):
                qmp.execute("block-export-del", id=export_id, mode="hard")
            _wait_until(
                lambda i=export_id: all(e.get("id") != i for e in qmp.execute("query-block-exports")),
                30,
                f"export {export_id} to go away",
            )
            removed.append(f"export {export_id}")
    for job in qmp.query_block_jobs():
        job_id = job.get("device", "")
        if job_id.startswith("sp-backup-"):
            with contextlib.suppress(QmpError):
                qmp.execute("block-job-cancel", device=job_id, force=True)
            _wait_until(
                lambda j=job_id: all(x.get("device") != j for x in qmp.query_block_jobs()), 30, f"job {job_id} to end"
            )
            removed.append(f"job {job_id}")
    for node in qmp.query_named_block_nodes():
        name = node.get("node-name", "")
        if name.startswith("sp-fleece-"):
            image = _image_of(node)
            qmp.execute("blockdev-del", node_name=name)
            removed.append(f"node {name}")
            if image and os.path.basename(image).startswith("fleece-"):
                with contextlib.suppress(OSError):
                    os.unlink(image)
                if os.path.basename(os.path.dirname(image)).startswith("surepoint-fleece-"):
                    workdirs.add(os.path.dirname(image))  # also holds the NBD server's socket
    if removed:  # the dead job's NBD server (an export of ours was on it)
        with contextlib.suppress(QmpError):
            qmp.execute("nbd-server-stop")
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return removed
