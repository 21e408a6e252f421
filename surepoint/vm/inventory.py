"""Which VMs exist and how to reach them: QEMU processes on this host, or an inventory file.

A VM run by plain QEMU is found from its command line (/proc/PID/cmdline): `-name`, the QMP
monitor socket (`-qmp unix:PATH` or `-chardev socket,path=PATH,id=X -mon chardev=X,mode=control`)
and the guest-agent channel (a chardev bound to `virtserialport ... name=org.qemu.guest_agent.0`).
An inventory file (TOML, `[vm.NAME] qmp = "..." guest_agent = "..."`) names VMs explicitly.
Running libvirt domains (SUREPOINT_LIBVIRT_URI, default qemu:///system) are listed too, when
libvirt-python is installed and libvirtd answers: see surepoint.vm.libvirt_domain.
"""

from __future__ import annotations

import os

from surepoint.errors import ConfigError, InvalidArgument
from surepoint.processes import command_lines
from surepoint.text import printable
from surepoint.tomlfile import read_toml
from surepoint.vm.errors import VmError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.info import VmInfo
from surepoint.vm.libvirt_domain import open_guest_agent, running_domains

GUEST_AGENT_PORT = "org.qemu.guest_agent.0"


class VmNotFound(VmError):
    pass


def _options(text: str) -> dict[str, str]:
    """Parse a QEMU option string `a=b,c=d` (first bare word goes under '')."""
    result: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            result[key] = value
        elif i == 0:
            result[""] = part
    return result


def parse_command_line(argv: list[str], pid: int | None = None) -> VmInfo | None:
    """A VmInfo from a QEMU command line, or None if it has no QMP unix socket."""
    name = None
    qmp = None
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    agent_chardev = None
    pairs = list(zip(argv, argv[1:], strict=False))
    for flag, value in pairs:
        if flag == "-name":
            opts = _options(value)
            name = opts.get("guest") or opts.get("")
        elif flag == "-qmp" and value.startswith("unix:"):
            qmp = value[len("unix:") :].split(",")[0]
        elif flag == "-chardev":
            opts = _options(value)
            if opts.get("") == "socket" and "path" in opts and "id" in opts:
                chardevs[opts["id"]] = opts["path"]
        elif flag == "-mon":
            opts = _options(value)
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
        elif flag == "-device":
            opts = _options(value)
            if opts.get("") == "virtserialport" and opts.get("name") == GUEST_AGENT_PORT:
                agent_chardev = opts.get("chardev")
    if qmp is None:
        qmp = next((chardevs[m] for m in monitors if m in chardevs), None)
    if qmp is None:
        return None
    agent = chardevs.get(agent_chardev) if agent_chardev else None
    return VmInfo(name or f"qemu-{pid}", qmp, agent, pid, list(argv))


def running_vms() -> list[VmInfo]:
    vms = []
    for pid, argv in command_lines():
        if os.path.basename(argv[0]).startswith("qemu-system"):
            info = parse_command_line(argv, pid)
            if info:
                vms.append(info)
    domains = running_domains()  # libvirt owns their monitors: reached through libvirtd, not a socket
    owned = {d.pid for d in domains if d.pid}
    vms = [v for v in vms if v.pid not in owned] + domains
    return sorted(vms, key=lambda v: v.name)


def load_inventory(path: str) -> list[VmInfo]:
    raw = read_toml(path, "VM inventory")
    vms = []
    for name, entry in (raw.get("vm") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("qmp"), str):
            raise ConfigError(f'{path}: [vm.{name}] needs qmp = "/path/to/qmp.sock"')
        vms.append(VmInfo(name, entry["qmp"], entry.get("guest_agent")))
    return vms


def find_vm(name: str, inventory: str | None = None) -> VmInfo:
    candidates = (load_inventory(inventory) if inventory else []) + running_vms()
    for vm in candidates:
        if vm.name == name:
            return vm
    known = ", ".join(sorted({v.name for v in candidates})) or "none"
    raise VmNotFound(f"no VM named {name!r} (running QEMU VMs with a QMP socket: {known})")


def guest_agent_for(vm_name: str, inventory: str | None) -> GuestAgent:
    """An open guest-agent connection to the VM `vm_name` (through libvirtd for a libvirt domain)."""
    vm = find_vm(vm_name, inventory)
    if not vm.guest_agent and not vm.libvirt_uri:
        raise InvalidArgument(f"VM {printable(vm_name)} has no guest-agent channel (org.qemu.guest_agent.0)")
    return open_guest_agent(vm, timeout=60.0)
