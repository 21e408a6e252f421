"""Failover: boot a replica at one of its restore points, and what follows (undo, permanent).

The replica's own files are never written. A failover puts a qcow2 overlay on the chosen point's
file of each disk, in the replica's `failover/` folder, rewrites the saved QEMU command line onto
those overlays (surepoint.vm.command_line), starts QEMU and waits for the guest agent. The record's
state becomes "failed-over" (replication of it pauses: a cycle would merge points under the
overlays) and its `failover` entry says which point runs, in which process, since when.

`undo_failover` stops that VM and drops the overlays: everything the replica VM wrote is thrown
away, the chain is as the last cycle left it, and replication goes on from where it stopped.

`make_permanent` turns the running replica into the production VM: QEMU streams the chain into
each overlay (block-stream: the overlay then stands alone, the guest keeps running), the chain
files go, the state is "permanent" and a start script for the next boot is written beside the
disks. Replication into that directory stops for good.

Layout of `failover/` while failed over::

    failover/DEVICE.qcow2     overlay, backing = the point's file (absolute name)
    failover/qemu.log         QEMU's output
    failover/qmp.sock, qga0.sock, console.log   what the rewritten command line makes (in
                              /run/surepoint/failover/HASH/ when failover/ is too long a path for a
                              unix socket; the record's `sockets` says where)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from surepoint.errors import InvalidArgument, TargetError
from surepoint.mount.instant import InstantSession, discard_instant
from surepoint.processes import process_start, same_process
from surepoint.replica.errors import ReplicaStateError
from surepoint.replica.layout import DISKS, FAILED_OVER, FAILOVER, PERMANENT, READY, ReplicaDir, ReplicaPoint, file_stem
from surepoint.replica.netmap import NetworkRule, apply_network
from surepoint.timestamps import utc_now
from surepoint.vm.boot import start_qemu, stop_qemu, wait_for_guest_agent, wait_gone
from surepoint.vm.command_line import disk_maps, rewrite
from surepoint.vm.errors import GuestAgentCommandError, GuestAgentError, GuestAgentTimeout, QmpError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.inventory import parse_command_line
from surepoint.vm.qmp import QmpConnection

VM_SUFFIX = "-replica"  # the -name of a replica VM: never the source's name, so the two are never confused
SHUTDOWN_TIMEOUT = 120.0
ACPI_AFTER = 30.0  # seconds a guest asked through its agent has before the power button is pressed too
STREAM_TIMEOUT = 3600.0
START_SCRIPT = "start-vm.sh"
RUNTIME_DIR = "/run/surepoint/failover"
SOCKET_PATH_ROOM = 80  # leaves 27 bytes of the 107 for "/" and a socket name such as qga0.sock
QEMU_IMG_TIMEOUT = 3600.0

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


@dataclass
class BootSpec:
    """What booting a replica state needs: the saved command line and, per disk, the file to use as
    the (read-only) backing file of an overlay. The recovery lab boots replica states from this too."""

    replica: str  # the replica directory
    vm: str  # the replicated VM's name
    point: str  # point id
    time: str
    consistency: str
    argv: list[str]
    disks: list[dict]  # the saved disks, in the order of `images`: {"device", "virtual_size", "filename"}
    images: list[str]  # the point's chain top of each disk (absolute path)

    @property
    def id(self) -> str:
        return f"replica:{self.replica}@{self.point}"


def boot_spec(replica: ReplicaDir, point: ReplicaPoint | str = "latest") -> BootSpec:
    """The BootSpec of `point` (a ReplicaPoint, or an id, id prefix, `latest` or time)."""
    p = replica.point(point) if isinstance(point, str) else point
    if not replica.source.argv:
        raise InvalidArgument(f"the replica of {replica.vm} has no saved QEMU command line: it cannot boot")
    disks = [{"device": d.device, "virtual_size": d.virtual_size, "filename": d.filename} for d in replica.source.disks]
    images = [replica.chain_files(p, d["device"]) for d in disks]
    return BootSpec(replica.path, replica.vm, p.id, p.time, p.consistency, list(replica.source.argv), disks, images)


def parse_replica_ref(ref: str) -> tuple[str, str]:
    """`replica:DIR[@POINT]` -> (DIR, POINT); POINT defaults to `latest`. InvalidArgument otherwise."""
    if not ref.startswith("replica:"):
        raise InvalidArgument(f"{ref!r} is not a replica state (replica:DIR[@POINT])")
    body = ref[len("replica:") :]
    path, sep, point = body.rpartition("@")
    if not sep:
        path, point = body, "latest"
    if not path:
        raise InvalidArgument(f"{ref!r} names no replica directory (replica:DIR[@POINT])")
    return path, point or "latest"


def make_overlays(spec: BootSpec, workdir: str) -> list[str]:
    """A fresh qcow2 overlay in `workdir` on each disk of `spec`; their paths, in disk order."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    overlays = []
    for disk, image in zip(spec.disks, spec.images, strict=True):
        overlay = os.path.join(workdir, f"{file_stem(disk['device'])}.qcow2")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(overlay)
        qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, overlay], f"overlay on {image}")
        os.chmod(overlay, 0o600)
        overlays.append(overlay)
    return overlays


def boot_argv(spec: BootSpec, overlays: list[str], workdir: str, name: str) -> list[str]:
    """The saved command line on the overlays, its sockets and logs in `workdir`, named `name`."""
    result = rewrite(spec.argv, name=name, workdir=workdir, disks=disk_maps(spec.disks, overlays, "qcow2"))
    if result.missing_disks or len(result.disks) != len(overlays):
        raise InvalidArgument(
            f"the saved command line of {spec.vm} does not name its disk(s) "
            + ", ".join(result.missing_disks or [d["filename"] or d["device"] for d in spec.disks])
        )
    return result.argv


# -- failover ----------------------------------------------------------------------------------


def failover(
    replica: ReplicaDir,
    point: str = "latest",
    *,
    boot_timeout: float = 300,
    network: list[NetworkRule] | None = None,
    planned: bool = False,
    log: Say | None = None,
) -> dict:
    """Boot the replica at `point` on overlays; returns the `failover` entry now in the record.

    ReplicaStateError when it is failed over already or was made permanent. The replica is locked
    for the whole boot; a boot that fails leaves the replica "ready" with no overlay behind.
    """
    say = log or _quiet
    with replica:
        require_state(replica, READY, "fail over")
        spec = boot_spec(replica, point)
        workdir = os.path.join(replica.path, FAILOVER)
        sockets = socket_dir(workdir)
        _clear_workdir(workdir)
        _clear_workdir(sockets)
        name = replica.vm + VM_SUFFIX
        overlays = make_overlays(spec, workdir)
        try:
            argv = apply_network(boot_argv(spec, overlays, sockets, name), network or [])
            info = parse_command_line(argv)
            if info is None or not info.guest_agent:
                raise InvalidArgument(
                    f"the saved command line of {replica.vm} has no QMP socket or no guest-agent channel: "
                    "its boot could not be watched"
                )
            entry = {
                "point": spec.point,
                "point_time": spec.time,
                "consistency": spec.consistency,
                "time": utc_now(),
                "planned": planned,
                "name": name,
                "overlays": {d["device"]: o for d, o in zip(spec.disks, overlays, strict=True)},
                "sockets": sockets,
                "argv": argv,
                "qmp": info.qmp,
                "guest_agent": info.guest_agent,
                "pid": None,
                "pid_start": None,
                "status": "booting",
            }
            replica.state = FAILED_OVER
            replica.failover = entry
            replica.save()  # before QEMU starts: a crash from here on is seen and undone like a failover
            say(f"booting {name} at point {spec.point} ({spec.time}, {spec.consistency})")
            started = time.monotonic()
            proc = start_qemu(argv, os.path.join(workdir, "qemu.log"))
            entry["pid"], entry["pid_start"] = proc.pid, process_start(proc.pid)
            replica.save()
            wait_for_guest_agent(proc, info.guest_agent, boot_timeout, log_path=os.path.join(workdir, "qemu.log"))
            entry["boot_seconds"] = round(time.monotonic() - started, 2)
            entry["status"] = "running"
            replica.save()
            say(f"{name} (pid {proc.pid}) answered on its guest agent after {entry['boot_seconds']:.1f} s")
            return entry
        except BaseException:
            with contextlib.suppress(Exception):
                _stop_entry(replica.failover, _quiet, clean=False)
            _clear_workdir(workdir)
            remove_socket_dir(sockets, workdir)
            replica.state = READY
            replica.failover = None
            replica.save()
            raise


def undo_failover(replica: ReplicaDir, log: Say | None = None) -> dict:
    """Stop the replica VM, drop its overlays and everything it wrote; the replica is "ready" again.

    Returns the failover entry that was undone. ReplicaStateError when it is not failed over.
    """
    say = log or _quiet
    with replica:
        require_state(replica, FAILED_OVER, "undo a failover of")
        entry = dict(replica.failover or {})
        _stop_entry(entry, say, clean=False)
        _clear_workdir(os.path.join(replica.path, FAILOVER))
        remove_socket_dir(entry.get("sockets"), os.path.join(replica.path, FAILOVER))
        replica.state = READY
        replica.failover = None
        replica.save()
        say(f"failover of {replica.vm} undone: the replica is at point {entry.get('point')} again")
        return entry


def make_permanent(replica: ReplicaDir, log: Say | None = None, timeout: float = STREAM_TIMEOUT) -> dict:
    """The running replica VM becomes the production VM: its disks stand alone, the chain goes.

    Returns the record's `permanent` entry (disks, start script). ReplicaStateError unless failed over
    with the VM running.
    """
    say = log or _quiet
    with replica:
        require_state(replica, FAILED_OVER, "make permanent")
        entry = replica.failover or {}
        if not same_process(entry.get("pid"), entry.get("pid_start")):
            raise ReplicaStateError(
                f"the failover VM of {replica.vm} (pid {entry.get('pid')}) is not running: only a running "
                "failover can become permanent"
            )
        started = time.monotonic()
        overlays: dict[str, str] = entry["overlays"]
        with QmpConnection(entry["qmp"], timeout=60) as qmp:
            jobs = []
            for dev in qmp.block_devices():
                if not any(dev.filename.endswith(o) or o in dev.filename for o in overlays.values()):
                    continue
                job = f"surepoint-permanent-{len(jobs)}"
                qmp.execute("block-stream", job_id=job, device=dev.node_name or dev.device)
                jobs.append(job)
                say(f"streaming the replica chain into {dev.filename} ({dev.size >> 20} MiB)")
            if len(jobs) != len(overlays):
                raise TargetError(f"the failover VM runs {len(jobs)} of its {len(overlays)} overlays: not touching it")
            _wait_jobs_gone(qmp, jobs, timeout)
            # the streamed clusters' tables may still sit in QEMU's cache; the chain is deleted next, so
            # flush them now: `stop` flushes every disk (the guest pauses for that moment)
            was_running = qmp.execute("query-status").get("running", False)
            qmp.execute("stop")
            if was_running:
                qmp.execute("cont")
        for path in overlays.values():
            if _qemu_img_info(path).get("backing-filename"):
                raise TargetError(f"{path} still has a backing file after block-stream")
        permanent = {
            "time": utc_now(),
            "disks": dict(overlays),
            "start_script": os.path.join(replica.path, FAILOVER, START_SCRIPT),
            "seconds": round(time.monotonic() - started, 1),
        }
        _write_start_script(permanent["start_script"], entry["argv"], replica.vm, entry.get("point", ""))
        replica.state = PERMANENT
        replica.extra["permanent"] = permanent
        disks = os.path.join(replica.path, DISKS)
        for name in os.listdir(disks) if os.path.isdir(disks) else []:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(disks, name))  # the chain: the disks stand alone now
        replica.points = []
        replica.save()
        say(f"{replica.vm}: the failover VM is now the production VM; disks in {os.path.join(replica.path, FAILOVER)}")
        return permanent


def _write_start_script(path: str, argv: list[str], vm: str, point: str) -> None:
    with open(path, "w") as f:
        f.write(
            f"#!/bin/sh\n# {vm}: permanent failover of its replica (point {point}); the disks stand alone\n"
            "exec " + " ".join(shlex.quote(a) for a in argv) + "\n"
        )
    os.chmod(path, 0o700)


# -- stopping a VM -----------------------------------------------------------------------------


def ask_guest_to_power_off(agent_path: str | None) -> str | None:
    """Ask the guest, through its agent, to power off; how it was asked, or None if no agent answers.

    `systemctl poweroff` first: qemu-ga's guest-shutdown runs shutdown(8), which on a systemd guest
    without logind (a minimal install) does nothing at all; then guest-shutdown for other guests.
    """
    if not agent_path:
        return None
    try:
        with GuestAgent(agent_path, timeout=10, sync_timeout=5) as ga:
            try:
                ga.exec_start(["systemctl", "poweroff"], capture=False)
                return "guest agent (systemctl poweroff)"
            except GuestAgentCommandError:  # no systemctl in this guest
                pass
            with contextlib.suppress(GuestAgentTimeout):  # no reply: the guest is going away
                ga.execute("guest-shutdown", {"mode": "powerdown"}, timeout=5)
            return "guest agent (guest-shutdown)"
    except (GuestAgentError, OSError):
        return None


def shutdown_vm(qmp_path: str | None, agent_path: str | None, pid: int, pid_start: int | None, timeout: float) -> str:
    """Shut a guest down cleanly and wait until its QEMU exits; how it was asked.

    Through the guest agent first; the ACPI power button (QMP system_powerdown) when no agent answers
    or the guest is still up after ACPI_AFTER seconds. TargetError when QEMU still runs after `timeout`.
    """
    how = ask_guest_to_power_off(agent_path)
    if how and wait_gone(pid, pid_start, min(ACPI_AFTER, timeout)):
        return how
    if qmp_path:
        with contextlib.suppress(QmpError, OSError, EOFError), QmpConnection(qmp_path, timeout=10) as qmp:
            qmp.execute("system_powerdown")
            how = f"{how} and the ACPI power button" if how else "ACPI power button"
    if not how:
        raise TargetError(f"cannot ask the VM (pid {pid}) to shut down: neither its guest agent nor QMP answers")
    if not wait_gone(pid, pid_start, timeout):
        raise TargetError(f"the VM (pid {pid}) did not shut down within {timeout:.0f} s (asked through the {how})")
    return how


def _stop_entry(entry: dict | None, say: Say, *, clean: bool) -> None:
    if not entry or not same_process(entry.get("pid"), entry.get("pid_start")):
        return
    if clean:
        how = shutdown_vm(
            entry.get("qmp"), entry.get("guest_agent"), entry["pid"], entry["pid_start"], SHUTDOWN_TIMEOUT
        )
        say(f"{entry.get('name')} shut down (asked through the {how})")
    else:
        stop_qemu(entry.get("qmp"), entry["pid"], entry["pid_start"])
        say(f"{entry.get('name')} (pid {entry['pid']}) stopped")


def stop_failover_vm(replica: ReplicaDir, say: Say, *, clean: bool) -> None:
    """Stop the failover VM of a failed-over replica (a clean guest shutdown, or QMP quit)."""
    _stop_entry(replica.failover, say, clean=clean)


# -- helpers -----------------------------------------------------------------------------------


def require_state(replica: ReplicaDir, wanted: str, what: str) -> None:
    if replica.state == wanted:
        return
    if replica.state == FAILED_OVER:
        entry = replica.failover or {}
        raise ReplicaStateError(
            f"cannot {what} {replica.vm}: it is failed over already (point {entry.get('point')}, "
            f"since {entry.get('time')}, pid {entry.get('pid')})"
        )
    if replica.state == PERMANENT:
        raise ReplicaStateError(f"cannot {what} {replica.vm}: its replica became the production VM (permanent)")
    raise ReplicaStateError(f"cannot {what} {replica.vm}: it is not failed over")


def socket_dir(workdir: str) -> str:
    """Where the failover VM's sockets go: `workdir`, unless its path is too long for a unix socket
    (108 bytes, name included); then a folder of its own under RUNTIME_DIR."""
    if len(workdir) <= SOCKET_PATH_ROOM:
        return workdir
    return os.path.join(RUNTIME_DIR, hashlib.sha256(workdir.encode()).hexdigest()[:16])


def remove_socket_dir(sockets: str | None, workdir: str) -> None:
    if sockets and sockets != workdir:
        with contextlib.suppress(FileNotFoundError):
            _clear_workdir(sockets)
            os.rmdir(sockets)


def _clear_workdir(workdir: str) -> None:
    """Remove what a failover left in `workdir` (overlays, sockets, logs); the folder stays, 0700."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chmod(workdir, 0o700)
    for name in os.listdir(workdir):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(os.path.join(workdir, name))


def qemu_img(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=QEMU_IMG_TIMEOUT
        )
    except FileNotFoundError:
        raise TargetError("qemu-img is not installed (package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise TargetError(f"{what}: qemu-img did not finish within {QEMU_IMG_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise TargetError(f"{what}: {lines[-1] if lines else f'qemu-img exited with {proc.returncode}'}")
    return proc.stdout


def _qemu_img_info(path: str) -> dict:
    return json.loads(qemu_img(["info", "--output=json", "-U", path], f"qemu-img info {path}"))


def _wait_jobs_gone(qmp: QmpConnection, jobs: list[str], timeout: float) -> None:
    """Wait until the block jobs are finished (auto-dismissed); TargetError when one failed."""
    deadline = time.monotonic() + timeout
    while True:
        for event in qmp.events():
            data = event.get("data", {})
            if event.get("event") == "BLOCK_JOB_COMPLETED" and data.get("device") in jobs and data.get("error"):
                raise TargetError(f"block job {data['device']} failed: {data['error']}")
        if not {j.get("device") for j in qmp.query_block_jobs()} & set(jobs):
            return
        if time.monotonic() > deadline:
            raise TargetError(f"streaming the replica chain did not finish within {timeout:.0f} s")
        time.sleep(0.5)


@dataclass
class FailoverView:
    """A replica as `failover` commands show it."""

    vm: str
    path: str
    state: str
    point: str | None = None
    since: str | None = None
    pid: int | None = None
    running: bool = False


def describe(replica: ReplicaDir) -> FailoverView:
    entry = replica.failover or {}
    return FailoverView(
        replica.vm,
        replica.path,
        replica.state,
        entry.get("point"),
        entry.get("time"),
        entry.get("pid"),
        same_process(entry.get("pid"), entry.get("pid_start")),
    )


# -- the recovery lab --------------------------------------------------------------------------


@dataclass
class ReplicaLabTarget:
    """A replica state standing where the recovery lab expects a restore point: it boots itself
    like an instant recovery (overlays on the point's files in the lab's work folder, the saved
    command line run by the lab's network and namespace), and the lab tears it down like one."""

    spec: BootSpec

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def name(self) -> str:
        return self.spec.vm

    @property
    def created(self) -> str:
        return self.spec.time

    @property
    def consistency(self) -> str:
        return self.spec.consistency

    @property
    def metadata(self) -> dict:
        return {"vm": {"command_line": self.spec.argv, "disks": self.spec.disks}}

    def boot(
        self,
        workdir: str,
        *,
        boot_timeout: float = 300,
        log: Say | None = None,
        name: str | None = None,
        command_prefix: list[str] | None = None,
        prepare_argv: Callable[[list[str]], list[str]] | None = None,
        **_instant_options: object,
    ) -> InstantSession:
        """Boot the replica state in `workdir`; the session record the lab's teardown reads."""
        say = log or _quiet
        workdir = os.path.abspath(workdir)
        session = InstantSession(
            workdir=workdir,
            restore_point=self.spec.id,
            name=name or f"{self.spec.vm}-replica-lab",
            repository=f"replica:{self.spec.replica}",
            mount_dir=os.path.join(workdir, "no-mount"),  # nothing is mounted: the replica's files are local
            command_prefix=list(command_prefix or []),
        )
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        session.save()
        try:
            overlays = make_overlays(self.spec, workdir)
            session.overlays = [
                {"number": n, "name": d["device"], "image": image, "overlay": overlay, "size": d["virtual_size"]}
                for n, (d, image, overlay) in enumerate(zip(self.spec.disks, self.spec.images, overlays, strict=True))
            ]
            argv = boot_argv(self.spec, overlays, workdir, session.name)
            session.argv = prepare_argv(argv) if prepare_argv else argv
            info = parse_command_line(session.argv)
            if info is None or not info.guest_agent:
                raise InvalidArgument(f"the saved command line of {self.spec.vm} has no QMP or guest-agent socket")
            session.qmp, session.guest_agent = info.qmp, info.guest_agent
            log_path = os.path.join(workdir, "qemu.log")
            started = time.monotonic()
            proc = start_qemu(session.command_prefix + session.argv, log_path)
            session.pid, session.pid_start = proc.pid, process_start(proc.pid)
            session.save()
            say(f"booting replica {self.spec.id}")
            wait_for_guest_agent(proc, info.guest_agent, boot_timeout, log_path=log_path)
            session.boot_seconds = session.total_seconds = round(time.monotonic() - started, 2)
            session.status = "running"
            session.save()
            return session
        except BaseException:
            with contextlib.suppress(Exception):
                discard_instant(workdir)
            raise
