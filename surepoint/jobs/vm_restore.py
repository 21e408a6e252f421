"""Recreate a VM from a restore point: restore its disks, rewrite its saved QEMU command line, boot it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable

from surepoint.errors import TargetError, UsageError
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.inventory import parse_command_line


def _replace_option(arg: str, key: str, value: str) -> str:
    parts = arg.split(",")
    return ",".join(f"{key}={value}" if p.startswith(f"{key}=") else p for p in parts)


def rewrite_command_line(
    argv: list[str], disks: list[dict], new_paths: list[str], disk_format: str, workdir: str, name: str
) -> list[str]:
    """The saved QEMU command line with restored disks, new sockets and console, and a new name."""
    old_to_new = {d["filename"]: p for d, p in zip(disks, new_paths, strict=True) if d.get("filename")}
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is None or not flag.startswith("-") or value.startswith("-"):  # a value never starts with "-"
            out.append(flag)
            i += 1
            continue
        if flag == "-name":
            value = name
        elif flag == "-qmp" and value.startswith("unix:"):
            value = f"unix:{workdir}/qmp.sock,server=on,wait=off"
        elif flag == "-chardev" and "path=" in value:
            chardev_id = next((p[3:] for p in value.split(",") if p.startswith("id=")), "chardev")
            value = _replace_option(value, "path", os.path.join(workdir, f"{chardev_id}.sock"))
        elif flag == "-serial" and value.startswith("file:"):
            value = f"file:{workdir}/console.log"
        elif flag == "-pidfile":
            value = os.path.join(workdir, "qemu.pid")
        elif flag in ("-blockdev", "-drive"):
            for old, new in old_to_new.items():
                if old in value:
                    value = value.replace(old, new)
                    for key in ("driver", "format"):
                        if f"{key}=qcow2" in value or f"{key}=raw" in value:
                            # only the format layer's driver names a format; file.driver names the protocol
                            value = ",".join(
                                f"{key}={disk_format}" if p in (f"{key}=qcow2", f"{key}=raw") else p
                                for p in value.split(",")
                            )
        out += [flag, value]
        i += 2
    return out


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
        raise UsageError(f"restore point {point.id} is not a VM backup (use `surepoint restore`)")
    if disk_format not in ("qcow2", "raw"):
        raise UsageError("--format must be qcow2 or raw")
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
    if argv:
        argv = rewrite_command_line(argv, vm.get("disks", []), paths, disk_format, target_dir, name)
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
    script = os.path.join(target_dir, "start-vm.sh")
    with open(script, "w") as f:
        f.write(
            "#!/bin/sh\n# Recreated by surepoint from restore point "
            + point.id
            + "\nexec "
            + " ".join(shlex.quote(a) for a in argv)
            + "\n"
        )
    os.chmod(script, 0o755)
    with open(os.path.join(target_dir, "vm.json"), "w") as f:
        json.dump({"restore_point": point.id, "argv": argv, "disks": paths, "original": vm}, f, indent=2)
    result: dict = {"restore_point": point.id, "disks": paths, "start_script": script, "argv": argv}
    if start:
        result.update(_boot(argv, target_dir, boot_timeout))
    return result


def _boot(argv: list[str], workdir: str, timeout: float) -> dict:
    # the chardev bound to the guest-agent port, whatever its id (rewritten to a socket in workdir)
    info = parse_command_line(argv)
    agent_socket = info.guest_agent if info else None
    started = time.monotonic()
    with open(os.path.join(workdir, "qemu.log"), "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    if agent_socket is None:
        return {"pid": proc.pid, "boot_seconds": 0.0, "guest_agent": None}
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"the restored VM exited with {proc.returncode}; see {workdir}/qemu.log")
        if os.path.exists(agent_socket):
            try:
                with GuestAgent(agent_socket, timeout=2.0, sync_timeout=1.0) as agent:
                    agent.ping()
                return {"pid": proc.pid, "boot_seconds": time.monotonic() - started, "guest_agent": agent_socket}
            except GuestAgentError:
                pass
        time.sleep(1)
    proc.kill()
    raise TargetError(f"the restored VM did not answer on its guest agent within {timeout:.0f} s")
