"""Instant VM recovery: boot a VM straight from the repository, then move it to production storage.

`start_instant` mounts a VM restore point (raw images only) under WORKDIR/repo-mount, puts a qcow2
overlay on each disk image (WORKDIR/disk<n>.qcow2, backing file the read-only raw image on the FUSE
mount), rewrites the saved QEMU command line to use the overlays and sockets in WORKDIR, starts
QEMU in a session of its own (it outlives the command) and waits for the guest agent. Every guest
write lands in an overlay; the repository is only read. WORKDIR/instant.json records the session.

`migrate_instant` copies the running VM's disks to a target directory with a QEMU block mirror
(sync=full, into new qcow2 images without backing file), switches every device over at once
(block-job-complete), drops the old overlay nodes (which closes the FUSE-backed backing files),
removes the overlays and unmounts the repository: the VM keeps running from the target.

`discard_instant` stops the VM (QMP quit, SIGKILL if it does not go), removes the overlays and
unmounts; it also cleans up after a crashed session (QEMU gone, mount dead or alive).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from surepoint.errors import InUse, InvalidArgument, NeedsRoot, NotAVmBackup, NotFound, SurepointError, TargetError
from surepoint.interrupt import checkpoint
from surepoint.mount.manager import MountOptions, mount_restore_point
from surepoint.mount.records import clean_stale, find_state, is_mountpoint, teardown
from surepoint.processes import process_start, same_process
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.statefile import write_json_atomically
from surepoint.vm.boot import start_qemu, stop_qemu, wait_for_guest_agent
from surepoint.vm.command_line import disk_maps, rewrite
from surepoint.vm.errors import QmpError
from surepoint.vm.qmp import QmpConnection

STATE_FILE = "instant.json"
MOUNT_SUBDIR = "repo-mount"
DEFAULT_BASE = "/var/lib/surepoint/instant"
JOB_PREFIX = "surepoint-migrate-"
MIRROR_TIMEOUT = 3600.0


@dataclass
class InstantSession:
    """WORKDIR/instant.json: what an instant recovery runs, and where its pieces are."""

    workdir: str
    restore_point: str
    name: str  # the VM's -name
    repository: str  # repository id
    mount_dir: str
    overlays: list[dict] = field(default_factory=list)  # {"number", "name", "image", "overlay", "size"}
    argv: list[str] = field(default_factory=list)
    command_prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NS: how QEMU is started
    qmp: str = ""
    guest_agent: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    status: str = "starting"  # starting, running, migrated
    started: float = field(default_factory=time.time)
    boot_seconds: float | None = None
    total_seconds: float | None = None
    migrated_to: str | None = None
    disks: list[str] = field(default_factory=list)  # after migration: the target images

    @staticmethod
    def path_in(workdir: str) -> str:
        return os.path.join(workdir, STATE_FILE)

    def save(self) -> None:
        write_json_atomically(self.path_in(self.workdir), asdict(self))

    @classmethod
    def load(cls, workdir: str) -> InstantSession | None:
        try:
            with open(cls.path_in(workdir)) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SurepointError(f"cannot read {cls.path_in(workdir)}: {exc}") from None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def qemu_alive(self) -> bool:
        return same_process(self.pid, self.pid_start)

    def to_json(self) -> dict:
        return dict(asdict(self), alive=self.qemu_alive(), state_file=self.path_in(self.workdir))


def default_workdir(point: RestorePoint) -> str:
    return os.path.join(DEFAULT_BASE, point.id)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise TargetError(f"{' '.join(argv[:2])} failed: {(proc.stderr or proc.stdout).strip()}")


def _check_workdir_free(workdir: str) -> None:
    session = InstantSession.load(workdir)
    if session is not None:
        if session.status == "migrated":
            raise InUse(
                f"{workdir} holds an instant recovery already migrated to {session.migrated_to} (VM pid {session.pid})"
            )
        if session.qemu_alive():
            raise InUse(
                f"{workdir} is in use: VM {session.name} (pid {session.pid}) runs from restore point "
                f"{session.restore_point}"
            )
        raise InUse(f"{workdir} holds a crashed instant recovery of {session.restore_point} (QEMU is gone)")
    mount_dir = os.path.join(workdir, MOUNT_SUBDIR)
    if os.path.isdir(mount_dir) and is_mountpoint(os.path.realpath(mount_dir)):
        raise InUse(f"{mount_dir} is already mounted")


def start_instant(
    repository: Repository,
    point: RestorePoint,
    workdir: str | None = None,
    *,
    boot_timeout: float = 300,
    options: MountOptions | None = None,
    log: Callable[[str], None] | None = None,
    name: str | None = None,
    command_prefix: list[str] | None = None,
    prepare_argv: Callable[[list[str]], list[str]] | None = None,
) -> InstantSession:
    """Boot the VM of `point` from the repository; returns the running session (saved in WORKDIR).

    A recovery lab passes `command_prefix` (QEMU then runs in the lab's network namespace) and
    `prepare_argv` (which moves the VM's network cards onto the lab's bridge).
    """
    say = log or (lambda _m: None)
    started = time.monotonic()
    vm = point.metadata.get("vm")
    if not vm:
        raise NotAVmBackup(f"restore point {point.id} ({point.name}) is not a VM backup: nothing to boot")
    argv = vm.get("command_line") or []
    if not argv:
        raise NotAVmBackup(f"restore point {point.id} has no saved QEMU command line")
    if os.geteuid() != 0:
        raise NeedsRoot("instant recovery needs root (FUSE mount of the repository)")
    workdir = os.path.abspath(workdir or default_workdir(point))
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_free(workdir)
    mount_dir = os.path.join(workdir, MOUNT_SUBDIR)
    os.makedirs(mount_dir, exist_ok=True)
    session = InstantSession(
        workdir=workdir,
        restore_point=point.id,
        name=name or f"{point.name}-instant",
        repository=repository.id,
        mount_dir=mount_dir,
        command_prefix=list(command_prefix or []),
    )
    session.save()
    try:
        opts = options or MountOptions()
        if opts.reader == "mount":
            opts = dataclasses.replace(opts, reader="instant")
        opts.filesystems = False
        opts.foreground = False
        state = mount_restore_point(repository, point, mount_dir, opts, say=say)
        images = {d["number"]: d for d in state.disks}
        say(f"restore point {point.id} mounted at {mount_dir} ({time.monotonic() - started:.1f} s)")
        for disk in point.disks:
            image = images[disk.number]["image"]
            overlay = os.path.join(workdir, f"disk{disk.number}.qcow2")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay)
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", overlay])
            session.overlays.append(
                {"number": disk.number, "name": disk.name, "image": image, "overlay": overlay, "size": disk.size}
            )
        session.save()
        saved_disks = vm.get("disks", [])
        overlays = [o["overlay"] for o in session.overlays]
        if len(saved_disks) != len(overlays):
            raise TargetError(
                f"restore point {point.id} has {len(overlays)} disks but its VM metadata names {len(saved_disks)}"
            )
        # -daemonize goes (QEMU must stay the process started here), sockets move into WORKDIR
        rewritten = rewrite(argv, name=session.name, workdir=workdir, disks=disk_maps(saved_disks, overlays, "qcow2"))
        if rewritten.missing_disks:
            raise TargetError(
                "cannot find the VM's disks in its saved command line ("
                + ", ".join(rewritten.missing_disks)
                + "); use `surepoint vm restore`"
            )
        for note in rewritten.notes:
            say(note)
        argv = rewritten.argv
        if prepare_argv is not None:
            argv = prepare_argv(argv)
        session.argv = argv
        if rewritten.qmp is None:
            raise NotAVmBackup("the saved command line has no QMP socket")
        session.qmp = rewritten.qmp
        session.guest_agent = rewritten.guest_agent
        for name in ("qmp.sock", "console.log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(workdir, name))
        session.save()
        boot_started = time.monotonic()
        _boot(session, boot_timeout)
        session.boot_seconds = round(time.monotonic() - boot_started, 2)
        session.total_seconds = round(time.monotonic() - started, 2)
        session.status = "running"
        session.save()
        say(f"VM {session.name} (pid {session.pid}) answered on its guest agent after {session.boot_seconds:.1f} s")
        return session
    except BaseException:
        with contextlib.suppress(Exception):
            _cleanup(session, say)
        raise


def _boot(session: InstantSession, timeout: float) -> None:
    """Start QEMU (it outlives the command) and wait for its guest agent.

    The pid is saved at once, so that an interrupted or failed boot is cleaned up like a crash.
    """
    log_path = os.path.join(session.workdir, "qemu.log")
    proc = start_qemu(session.command_prefix + session.argv, log_path)
    session.pid = proc.pid
    session.pid_start = process_start(proc.pid)
    session.save()
    checkpoint("instant-booting")
    if session.guest_agent is None:
        raise NotAVmBackup("the saved command line has no guest-agent channel: cannot tell when the VM is up")
    wait_for_guest_agent(proc, session.guest_agent, timeout, log_path=log_path)


def _stop_qemu(session: InstantSession, say: Callable[[str], None], timeout: float = 20.0) -> None:
    stop_qemu(session.qmp, session.pid, session.pid_start, timeout, say, "the overlays and the mount are left in place")


def _unmount(session: InstantSession, say: Callable[[str], None]) -> None:
    clean_stale(log=say)
    state = find_state(session.mount_dir)
    if state is not None:
        try:
            teardown(state, lazy=False, log=say)
        except SurepointError as exc:
            say(f"{exc}; detaching lazily")
            teardown(state, lazy=True, log=say)
    with contextlib.suppress(OSError):
        os.rmdir(session.mount_dir)


def _cleanup(session: InstantSession, say: Callable[[str], None]) -> None:
    """Stop QEMU, remove the overlays, unmount the repository, forget the session."""
    _stop_qemu(session, say)
    for entry in session.overlays:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry["overlay"])
    _unmount(session, say)
    for name in ("qmp.sock", "console.log", STATE_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(session.workdir, name))
    for arg in session.argv:  # the guest-agent and other chardev sockets QEMU made in WORKDIR
        for part in arg.split(","):
            if part.startswith("path=") and os.path.dirname(part[5:]) == session.workdir:
                with contextlib.suppress(OSError):
                    os.unlink(part[5:])


def _load(workdir: str) -> InstantSession:
    workdir = os.path.abspath(workdir)
    session = InstantSession.load(workdir)
    if session is None:
        raise NotFound(f"no instant recovery in {workdir} (no {STATE_FILE})")
    return session


def discard_instant(workdir: str, log: Callable[[str], None] | None = None) -> InstantSession:
    """Stop the instant VM and drop everything it wrote; also cleans a crashed session."""
    say = log or (lambda _m: None)
    session = _load(workdir)
    if session.status == "migrated":
        raise InvalidArgument(
            f"the VM of {session.workdir} was migrated to {session.migrated_to} and no longer depends on the "
            "repository: there is nothing to discard (stop the VM through its QMP socket "
            f"{session.qmp} if it is not wanted)"
        )
    _cleanup(session, say)
    return session


def _wait_jobs(qmp: QmpConnection, jobs: list[str], until: str, timeout: float, say: Callable[[str], None]) -> None:
    """Wait until every job is `ready` (until="ready") or `concluded` (until="concluded"); raise on failure."""
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while True:
        status = {j["id"]: j for j in qmp.execute("query-jobs") if j["id"] in jobs}
        for job_id in jobs:
            job = status.get(job_id)
            if job is None:
                raise TargetError(f"block job {job_id} disappeared")
            if job.get("error"):
                raise TargetError(f"block job {job_id} failed: {job['error']}")
            if until == "ready" and job["status"] == "concluded":
                raise TargetError(f"block job {job_id} ended before it was ready")
        if all(status[j]["status"] == until for j in jobs):
            return
        now = time.monotonic()
        if now > deadline:
            raise TargetError(f"the block mirror did not become {until} within {timeout:.0f} s")
        if until == "ready" and now - last_report > 10:
            last_report = now
            done = sum(status[j].get("current-progress", 0) for j in jobs)
            total = sum(status[j].get("total-progress", 0) for j in jobs) or 1
            say(f"mirroring: {100 * done / total:.0f}% ({done >> 20} of {total >> 20} MiB)")
        time.sleep(0.5)


def migrate_instant(
    workdir: str, target_dir: str, log: Callable[[str], None] | None = None, timeout: float = MIRROR_TIMEOUT
) -> InstantSession:
    """Mirror the running instant VM's disks into TARGET_DIR, switch over, drop the repository."""
    say = log or (lambda _m: None)
    session = _load(workdir)
    if session.status == "migrated":
        raise InvalidArgument(f"the VM of {session.workdir} was already migrated to {session.migrated_to}")
    if not session.qemu_alive():
        raise TargetError(f"the instant VM's QEMU (pid {session.pid}) is gone: nothing to migrate")
    target_dir = os.path.abspath(target_dir)
    os.makedirs(target_dir, exist_ok=True)
    started = time.monotonic()
    try:
        qmp = QmpConnection(session.qmp, timeout=60)
    except QmpError as exc:
        raise TargetError(f"cannot reach the instant VM's QMP socket {session.qmp}: {exc}") from None
    with qmp:
        devices = qmp.block_devices()
        by_overlay = {}
        for dev in devices:
            match = next((o for o in session.overlays if o["overlay"] in dev.filename), None)
            if match is not None:
                by_overlay[match["number"]] = dev
        if len(by_overlay) != len(session.overlays):
            raise TargetError(
                "the instant VM's disks are not all on their overlays any more: "
                + ", ".join(f"{d.node_name or d.device}={d.filename}" for d in devices)
            )
        plan = []
        for entry in session.overlays:
            dev = by_overlay[entry["number"]]
            base = os.path.basename(entry["name"]) or "disk"
            target = os.path.join(target_dir, f"disk{entry['number']}-{base}.qcow2")
            if os.path.exists(target):
                raise InUse(f"{target} exists: the migration target directory must be empty")
            plan.append((entry, dev, target, f"{JOB_PREFIX}{entry['number']}"))
        created: list[tuple[str, str]] = []  # (node name, path)
        jobs: list[str] = []
        try:
            for entry, dev, target, node in plan:
                _run(["qemu-img", "create", "-q", "-f", "qcow2", target, str(dev.size)])
                created.append((node, target))
                qmp.execute_args(
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": target},
                        # the raw images on FUSE report no holes: zeros are copied as data; keep them sparse
                        "detect-zeroes": "unmap",
                        "discard": "unmap",
                    },
                )
                source = dev.device or dev.node_name
                qmp.execute_args(
                    "blockdev-mirror",
                    {
                        "job-id": node,
                        "device": source,
                        "target": node,
                        "sync": "full",
                        "auto-dismiss": False,
                    },
                )
                jobs.append(node)
                say(f"disk {entry['number']} ({entry['name']}): mirroring {dev.size >> 20} MiB to {target}")
            _wait_jobs(qmp, jobs, "ready", timeout, say)
            say(f"all disks in sync after {time.monotonic() - started:.1f} s: switching over")
            for job in jobs:
                qmp.execute("block-job-complete", device=job)
            _wait_jobs(qmp, jobs, "concluded", 300, say)
        except BaseException:
            for job in jobs:
                with contextlib.suppress(QmpError):
                    qmp.execute("block-job-cancel", device=job, force=True)
            for job in jobs:
                with contextlib.suppress(QmpError):
                    _wait_jobs(qmp, [job], "concluded", 30, say)
                with contextlib.suppress(QmpError):
                    qmp.execute("job-dismiss", id=job)
            for node, path in created:
                with contextlib.suppress(QmpError):
                    qmp.execute("blockdev-del", node_name=node)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        for job in jobs:
            qmp.execute("job-dismiss", id=job)
        # the devices now use the targets; the old overlay nodes (and their FUSE backing files) go
        for _entry, dev, _target, _node in plan:
            if dev.node_name:
                try:
                    qmp.execute("blockdev-del", node_name=dev.node_name)
                except QmpError as exc:  # a -drive node belongs to its device and went with the switch
                    say(f"old node {dev.node_name}: {exc}")
        watched = [session.mount_dir] + [o["overlay"] for o in session.overlays]
        still = [
            n.get("node-name") or "?"
            for n in qmp.query_named_block_nodes()
            if any(w in (n.get("file") or "") for w in watched)
        ]
        if still:
            raise TargetError(f"QEMU still uses the repository mount (nodes {', '.join(still)}); not unmounting")
        now_on = {d.node_name: d.filename for d in qmp.block_devices()}
    session.status = "migrated"
    session.migrated_to = target_dir
    session.disks = [target for _e, _d, target, _n in plan]
    session.save()
    say(f"switched over: the VM runs from {target_dir} ({', '.join(now_on.values())})")
    for entry in session.overlays:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry["overlay"])
    _unmount(session, say)
    # a start script for the next boot, from the targets (sockets in the target directory)
    overlay_disks = [{"filename": o["overlay"]} for o in session.overlays]
    maps = disk_maps(overlay_disks, session.disks, "qcow2")
    argv = rewrite(session.argv, name=session.name, workdir=target_dir, disks=maps).argv
    script = os.path.join(target_dir, "start-vm.sh")
    with open(script, "w") as f:
        f.write(
            f"#!/bin/sh\n# Migrated by surepoint from instant recovery of restore point {session.restore_point}\n"
            "exec " + " ".join(shlex.quote(a) for a in argv) + "\n"
        )
    os.chmod(script, 0o755)
    say(f"migration done in {time.monotonic() - started:.1f} s; start script for the next boot: {script}")
    return session
