"""Recreate a VM from a restore point: restore its disks, rewrite its saved QEMU command line, boot it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable

from surepoint.errors import InvalidArgument, NotAVmBackup, TargetError
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.vm.boot import start_qemu, wait_for_guest_agent
from surepoint.vm.command_line import disk_maps, rewrite
from surepoint.vm.inventory import parse_command_line


def restore_vm(
    repository: Repository,
    point: RestorePoint,
    target_dir: str,
    *,
    disk_format: str = "qcow2",
    start: bool = False,
    boot_timeout: float = 300,
    log: Callable[[str], None] | None = None,
) -> dict:
    say = log or (lambda _m: None)
    vm = point.metadata.get("vm")
    if not vm:
        raise NotAVmBackup(f"restore point {point.id} ({point.name}) is not a VM backup")
    if disk_format not in ("qcow2", "raw"):
        raise InvalidArgument(f"a restored disk is qcow2 or raw, not {disk_format!r}")
    os.makedirs(target_dir, exist_ok=True)
    target_dir = os.path.abspath(target_dir)
    paths = []
    for disk in point.disks:
        base = os.path.join(target_dir, f"disk{disk.number}-{os.path.basename(disk.name) or 'disk'}")
        raw = base + ".raw"
        say(f"restoring disk {disk.number} ({disk.name}, {disk.size} bytes)")
        restore_disk(repository, point, disk.number, raw)
        if disk_format == "qcow2":
            final = base + ".qcow2"
            proc = subprocess.run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, final], capture_output=True, text=True
            )
            os.unlink(raw)
            if proc.returncode != 0:
                raise TargetError(f"qemu-img convert failed: {proc.stderr.strip()}")
            paths.append(final)
        else:
            paths.append(raw)
    name = f"{point.name}-restored"
    argv = vm.get("command_line") or []
    notes: list[str] = []
    if argv:
        rewritten = rewrite(
            argv, name=name, workdir=target_dir, disks=disk_maps(vm.get("disks", []), paths, disk_format)
        )
        notes = rewritten.notes
        # a VM that daemonized keeps doing so from its start script; --start runs QEMU itself
        script_argv = rewritten.daemon_argv() if rewritten.daemonize else rewritten.argv
        argv = rewritten.argv
    else:
        argv = [
            "qemu-system-x86_64",
            "-name",
            name,
            "-machine",
            "q35",
            "-m",
            "1024",
            "-display",
            "none",
            "-qmp",
            f"unix:{target_dir}/qmp.sock,server=on,wait=off",
        ]
        for path in paths:
            argv += ["-drive", f"file={path},format={disk_format},if=virtio"]
        script_argv = argv
    for note in notes:
        say(note)
    script = os.path.join(target_dir, "start-vm.sh")
    with open(script, "w") as f:
        f.write(
            "#!/bin/sh\n# Recreated by surepoint from restore point "
            + point.id
            + "\nexec "
            + " ".join(shlex.quote(a) for a in script_argv)
            + "\n"
        )
    os.chmod(script, 0o755)
    with open(os.path.join(target_dir, "vm.json"), "w") as f:
        json.dump({"restore_point": point.id, "argv": argv, "disks": paths, "original": vm}, f, indent=2)
    result: dict = {"restore_point": point.id, "disks": paths, "start_script": script, "argv": argv, "notes": notes}
    if start:
        result.update(_boot(argv, target_dir, boot_timeout))
    return result


def _boot(argv: list[str], workdir: str, timeout: float) -> dict:
    # the chardev bound to the guest-agent port, whatever its id (rewritten to a socket in workdir)
    info = parse_command_line(argv)
    agent_socket = info.guest_agent if info else None
    log_path = os.path.join(workdir, "qemu.log")
    proc = start_qemu(argv, log_path)
    if agent_socket is None:
        return {"pid": proc.pid, "boot_seconds": 0.0, "guest_agent": None}
    try:
        seconds = wait_for_guest_agent(proc, agent_socket, timeout, log_path=log_path, interval=1.0)
    except TargetError:
        proc.kill()
        raise
    return {"pid": proc.pid, "boot_seconds": seconds, "guest_agent": agent_socket}
