"""Failback: after a failover, bring the original VM up to date with what the replica wrote, then
switch back to it.

What has to reach the original disk is (a) every block the replica VM wrote since the failover,
which is exactly what its failover overlay holds (`qemu-img map`: the extents at depth 0), and
(b) every block where the original itself moved away from the failover point (it kept running
after the point was taken, or was shut down after it). (b) is found by comparing contents: a copy
of the overlay (the delta) is rebased in safe mode from the point's chain onto the original disk,
and `qemu-img rebase` copies into the delta every cluster the delta does not hold where the two
backing chains read differently, i.e. the original's divergence, with the point's data. The delta
then holds the union of (a) and (b) and nothing else; `qemu-img commit` writes it into the original
disk. The bytes counted as sent are the delta's data extents: what would cross the network to a
remote original. The original VM's changed-block bitmaps (backups, replication) did not see these
writes, so they are removed: the next backup and the next replication cycle compare contents.

The switch, in order: the original must be powered off; the replica VM is shut down cleanly
(guest agent, then ACPI), the delta of each disk is built and committed, the original VM is started
from its saved command line and its guest agent awaited. The replica's own files are still untouched:
its failover overlays are dropped and it is "ready" again, at the point it failed over from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable

from surepoint.errors import InUse, InvalidArgument, TargetError
from surepoint.processes import command_lines
from surepoint.replica.failover import qemu_img, remove_socket_dir, require_state, stop_failover_vm, wait_gone
from surepoint.replica.layout import FAILED_OVER, FAILOVER, READY, ReplicaDir, file_stem
from surepoint.timestamps import utc_now
from surepoint.vm.boot import start_qemu, wait_for_guest_agent
from surepoint.vm.command_line import disk_maps, rewrite
from surepoint.vm.inventory import parse_command_line

BITMAP_PREFIX = "surepoint"  # changed-block bitmaps of backups and replication

Say = Callable[[str], None]


def extents(path: str) -> list[dict]:
    """`qemu-img map` of the image's own extents (depth 0): {"start", "length", "data", "zero"}."""
    out = qemu_img(["map", "--output=json", "-f", "qcow2", path], f"map {path}")
    return [e for e in json.loads(out) if e.get("depth", 0) == 0 and (e.get("data") or e.get("zero"))]


def data_bytes(path: str) -> int:
    """Bytes of data (not zero extents) an image holds itself."""
    return sum(e["length"] for e in extents(path) if e.get("data"))


def failback(
    replica: ReplicaDir,
    *,
    to: str = "original",
    start: bool = True,
    boot_timeout: float = 300,
    log: Say | None = None,
) -> dict:
    """Write the replica's changes back and switch to the original (or to a new location `to`).

    Returns the report: bytes sent per disk and in all, disk sizes, timings, the started VM.
    """
    say = log or (lambda _m: None)
    with replica:
        require_state(replica, FAILED_OVER, "fail back")
        entry = dict(replica.failover or {})
        overlays: dict[str, str] = entry.get("overlays", {})
        disks = replica.source.disks
        started = time.monotonic()
        if to == "original":
            targets = {d.device: d.filename for d in disks}
            for device, path in targets.items():
                if not path or not os.path.exists(path):
                    raise InvalidArgument(
                        f"the original disk {device} of {replica.vm} ({path or 'no file name saved'}) does not "
                        "exist here: fail back to a new location instead"
                    )
            running = _users_of(list(targets.values()))
            if running:
                pid, path = running[0]
                raise InUse(f"the original VM of {replica.vm} is running (pid {pid} uses {path}): shut it down first")
            new_dir = None
        else:
            new_dir = os.path.abspath(to)
            os.makedirs(new_dir, mode=0o700, exist_ok=True)
            targets = {d.device: os.path.join(new_dir, f"{file_stem(d.device)}.qcow2") for d in disks}
            taken = [p for p in targets.values() if os.path.exists(p)]
            if taken:
                raise InUse(f"{taken[0]} exists: a failback to a new location needs an empty directory")
        say(f"shutting down {entry.get('name')} (the replica VM)")
        stop_failover_vm(replica, say, clean=True)
        switch_started = time.monotonic()
        report_disks = []
        for disk in disks:
            overlay = overlays[disk.device]
            target = targets[disk.device]
            changed = data_bytes(overlay)
            if new_dir is None:
                sent, diverged_from = _write_back(overlay, target, say)
                removed = _remove_bitmaps(target)
            else:
                qemu_img(["convert", "-q", "-O", "qcow2", "-f", "qcow2", overlay, target], f"copy {overlay}")
                os.chmod(target, 0o600)
                sent, diverged_from, removed = data_bytes(target), 0, []
            report_disks.append(
                {
                    "device": disk.device,
                    "target": target,
                    "virtual_size": disk.virtual_size,
                    "replica_changed_bytes": changed,
                    "diverged_bytes": diverged_from,
                    "sent_bytes": sent,
                    "bitmaps_removed": removed,
                }
            )
            say(
                f"{disk.device}: sent {sent / 2**20:.1f} MiB of {disk.virtual_size / 2**20:.0f} MiB "
                f"(replica wrote {changed / 2**20:.1f} MiB)"
            )
        write_seconds = time.monotonic() - switch_started
        for name in os.listdir(os.path.join(replica.path, FAILOVER)):
            if not name.endswith(".log"):  # the logs of the last failover stay until the next one
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(replica.path, FAILOVER, name))
        remove_socket_dir(entry.get("sockets"), os.path.join(replica.path, FAILOVER))
        report = {
            "vm": replica.vm,
            "to": "original" if new_dir is None else new_dir,
            "failover_point": entry.get("point"),
            "time": utc_now(),
            "disks": report_disks,
            "sent_bytes": sum(d["sent_bytes"] for d in report_disks),
            "disk_bytes": sum(d["virtual_size"] for d in report_disks),
            "write_seconds": round(write_seconds, 2),
        }
        replica.state = READY
        replica.failover = None
        replica.extra["failback"] = report
        replica.save()
    if start:
        report.update(_start(replica, new_dir, targets, boot_timeout, say))
        report["switch_seconds"] = round(time.monotonic() - switch_started, 2)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _write_back(overlay: str, target: str, say: Say) -> tuple[int, int]:
    """Commit the overlay's data and the original's divergence into `target`; (sent, diverged) bytes."""
    fmt = _info(target).get("format", "raw")
    delta = overlay + ".failback"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(delta)
    shutil.copyfile(overlay, delta)  # the overlay is small: its data and metadata only
    try:
        before = data_bytes(delta)
        # safe rebase: where the point's chain and the original read differently, the point's data is
        # copied into the delta (clusters the delta holds already are the replica's newer data)
        qemu_img(["rebase", "-q", "-f", "qcow2", "-F", fmt, "-b", target, delta], f"compare {target} with the replica")
        sent = data_bytes(delta)
        say(f"{os.path.basename(target)}: {max(0, sent - before) / 2**20:.1f} MiB where the original diverged")
        qemu_img(["commit", "-q", "-f", "qcow2", delta], f"write into {target}")
        return sent, max(0, sent - before)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(delta)


def _remove_bitmaps(path: str) -> list[str]:
    """Remove the surepoint changed-block bitmaps of a qcow2 (they did not see the failback's writes)."""
    info = _info(path)
    if info.get("format") != "qcow2":
        return []
    names = [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
    removed = []
    for name in names:
        if name.startswith(BITMAP_PREFIX):
            qemu_img(["bitmap", "--remove", "-f", "qcow2", path, name], f"remove bitmap {name} of {path}")
            removed.append(name)
    return removed


def _start(replica: ReplicaDir, new_dir: str | None, targets: dict[str, str], timeout: float, say: Say) -> dict:
    argv = replica.source.argv
    if not argv:
        return {"started": False, "note": "no saved command line: start the VM yourself"}
    workdir = new_dir
    if new_dir is None:
        argv = [a for a in argv if a != "-daemonize"]  # watch QEMU itself
    else:
        disks = [{"filename": d.filename} for d in replica.source.disks]
        new_paths = [targets[d.device] for d in replica.source.disks]
        argv = rewrite(argv, name=replica.vm, workdir=new_dir, disks=disk_maps(disks, new_paths, "qcow2")).argv
    info = parse_command_line(argv)
    log_path = os.path.join(workdir or os.path.join(replica.path, FAILOVER), "original-qemu.log")
    say(f"starting {replica.vm}")
    begun = time.monotonic()
    proc = start_qemu(argv, log_path)
    if info is None or not info.guest_agent:
        return {"started": True, "pid": proc.pid, "boot_seconds": None}
    try:
        wait_for_guest_agent(proc, info.guest_agent, timeout, log_path=log_path)
    except TargetError:
        proc.kill()
        wait_gone(proc.pid, None, 5)
        raise
    seconds = round(time.monotonic() - begun, 2)
    say(f"{replica.vm} (pid {proc.pid}) answered on its guest agent after {seconds:.1f} s")
    return {"started": True, "pid": proc.pid, "boot_seconds": seconds, "qmp": info.qmp, "guest_agent": info.guest_agent}


def _users_of(paths: list[str]) -> list[tuple[int, str]]:
    """(pid, path) of QEMU processes whose command line names one of `paths`."""
    found = []
    for pid, argv in command_lines():
        if not os.path.basename(argv[0]).startswith("qemu"):
            continue
        for path in paths:
            if any(path in a for a in argv):
                found.append((pid, path))
    return found


def _info(path: str) -> dict:
    return json.loads(qemu_img(["info", "--output=json", path], f"inspect {path}"))
