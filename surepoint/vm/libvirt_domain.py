"""VMs managed by libvirt: find the running domains, and talk QMP and guest-agent through libvirtd.

libvirtd owns a domain's QEMU monitor and its guest-agent channel (each takes one client), so the
backup cannot connect to their sockets itself. It passes its commands through libvirt instead:
QMP with `virDomainQemuMonitorCommand` and agent commands with `virDomainQemuAgentCommand` (module
libvirt_qemu of libvirt-python, the optional extra `surepoint[libvirt]`). LibvirtQmp and
LibvirtGuestAgent have the methods of QmpConnection and GuestAgent that the point-in-time view and
the backup job use, so those run unchanged. libvirt marks a domain "tainted" (custom-monitor,
custom-ga-command) when it passes commands through; the domain is not otherwise affected.

The NBD exports of the view are unix sockets that QEMU creates, so the libvirt URI must be local.
libvirt usually runs QEMU as an unprivileged user (qemu.conf user=, the domain's DAC seclabel): the
temporary images and socket directory of a view, which surepoint makes in a `surepoint-*` directory
of its own, are given to that user before QEMU is asked to open them. A MAC confinement of QEMU
(AppArmor, SELinux) would have to allow those temporary paths too.

Disks are named by their libvirt target (vda, sdb, ...) rather than by libvirt's node names
(libvirt-2-format), which change when the domain restarts.

A restore defines a domain again from its saved XML (`restored_domain_xml`: new name, restored
disks, what libvirt adds only while a domain runs removed, a new UUID and MACs beside the original)
and looks at the disks of a defined domain (`domain_disks`).

Some 700 lines on purpose: this is the one adapter to libvirt (finding domains, QMP and agent
pass-through, ownership of temporary files, redefining a restored domain), kept together so the
rest of vm/ never imports libvirt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from surepoint.vm.errors import (
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeout,
    GuestAgentUnavailable,
    QmpCommandError,
    QmpError,
    QmpTimeout,
    VmError,
)
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.info import VmInfo
from surepoint.vm.qmp import DEFAULT_TIMEOUT, BlockDevice, QmpConnection

DEFAULT_URI = "qemu:///system"
URI_ENV = "SUREPOINT_LIBVIRT_URI"  # another URI; "" or "none" turns the libvirt lookup off
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
OWN_DIR_PREFIX = "surepoint-"  # temporary directories surepoint makes (fleece work dirs)

_lock = threading.Lock()
_modules: tuple[Any, Any] | None = None


class LibvirtError(VmError):
    """libvirt-python is missing, libvirtd cannot be reached, or it refused a request."""


def _libvirt() -> tuple[Any, Any]:
    """The modules libvirt and libvirt_qemu; LibvirtError when libvirt-python is not installed."""
    global _modules
    with _lock:
        if _modules is None:
            try:
                import libvirt
                import libvirt_qemu
            except ImportError:
                raise LibvirtError(
                    "libvirt-python is not installed (install surepoint with the 'libvirt' extra)"
                ) from None
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no messages on stderr
            _modules = (libvirt, libvirt_qemu)
        return _modules


def available() -> bool:
    """True when libvirt-python can be imported."""
    try:
        _libvirt()
    except LibvirtError:
        return False
    return True


def configured_uri() -> str | None:
    """The libvirt URI to look for domains at (SUREPOINT_LIBVIRT_URI, default qemu:///system), or None."""
    uri = os.environ.get(URI_ENV, DEFAULT_URI).strip()
    return None if uri.lower() in ("", "none") else uri


def connect(uri: str | None = None) -> Any:
    """A libvirt connection (virConnect) to `uri`; LibvirtError if libvirtd does not answer."""
    libvirt, _ = _libvirt()
    uri = uri or configured_uri() or DEFAULT_URI
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from None


# -- domain XML ---------------------------------------------------------------------------------


def agent_channel(domain_xml: str) -> str | None:
    """The host path of the domain's guest-agent channel (unix), or None if it has none."""
    root = ET.fromstring(domain_xml)
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == GUEST_AGENT_PORT:
            source = channel.find("source")
            return (source.get("path") if source is not None else None) or "(libvirt)"
    return None


def disk_targets(domain_xml: str) -> dict[str, str]:
    """Device alias (virtio-disk0, the QEMU qdev id) -> target name (vda) of the domain's disks."""
    root = ET.fromstring(domain_xml)
    targets = {}
    for disk in root.iterfind("./devices/disk"):
        alias, target = disk.find("alias"), disk.find("target")
        if alias is not None and target is not None and alias.get("name") and target.get("dev"):
            targets[alias.get("name")] = target.get("dev")
    return targets


def qemu_owner(domain_xml: str) -> tuple[int, int] | None:
    """uid and gid QEMU runs as, from the live XML's DAC seclabel (`+64055:+64055` or `user:group`)."""
    root = ET.fromstring(domain_xml)
    for label in root.iterfind("./seclabel[@model='dac']/label"):
        text = (label.text or "").strip()
        user, _, group = text.partition(":")
        try:
            uid = int(user[1:]) if user.startswith("+") else _uid(user)
            gid = int(group[1:]) if group.startswith("+") else _gid(group)
        except (KeyError, ValueError):
            return None
        return uid, gid
    return None


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


# -- inventory ----------------------------------------------------------------------------------


def _pid(name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError), open(f"/run/libvirt/qemu/{name}.pid") as f:
        return int(f.read().strip())
    return None


def _cmdline(pid: int | None) -> list[str]:
    if pid is None:
        return []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    return []


def _vm_info(dom: Any, uri: str) -> VmInfo:
    xml = dom.XMLDesc(0)
    name = dom.name()
    pid = _pid(name)
    return VmInfo(
        name,
        f"libvirt:{uri}",
        agent_channel(xml),
        pid,
        _cmdline(pid),
        libvirt_uri=uri,
        domain_xml=xml,
    )


def running_domains(uri: str | None = None) -> list[VmInfo]:
    """The running QEMU/KVM domains of libvirt at `uri`; [] when libvirt is missing or unreachable."""
    uri = uri or configured_uri()
    if uri is None or not available():
        return []
    libvirt, _ = _libvirt()
    try:
        conn = connect(uri)
    except LibvirtError:
        return []
    try:
        if conn.getType() != "QEMU":
            return []
        vms = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # a domain that stopped meanwhile
                vms.append(_vm_info(dom, uri))
        return sorted(vms, key=lambda v: v.name)
    except libvirt.libvirtError:
        return []
    finally:
        conn.close()


def find_domain(name: str, uri: str | None = None) -> VmInfo | None:
    """The running libvirt domain called `name`, or None (also when libvirt is missing or unreachable)."""
    uri = uri or configured_uri()
    if uri is None or not available():
        return None
    libvirt, _ = _libvirt()
    try:
        conn = connect(uri)
    except LibvirtError:
        return None
    try:
        dom = conn.lookupByName(name)
        return _vm_info(dom, uri) if dom.isActive() else None
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def _lookup(conn: Any, name: str) -> Any:
    libvirt, _ = _libvirt()
    try:
        dom = conn.lookupByName(name)
        active = dom.isActive()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt domain {name!r}: {exc.get_error_message()}") from None
    if not active:
        raise LibvirtError(f"libvirt domain {name!r} is not running")
    return dom


# -- QMP through libvirt ------------------------------------------------------------------------


class LibvirtQmp(QmpConnection):
    """QMP to a libvirt domain's QEMU, passed through libvirtd (virDomainQemuMonitorCommand).

    Has what the point-in-time view and the backup job use of QmpConnection: execute, execute_args,
    the query_* helpers, block_devices, resolve_node, close and the context manager. QMP events are
    not available this way (libvirt consumes them): wait_event and events raise QmpError. `timeout`
    is not enforced per command; libvirt bounds how long a command waits for the monitor.
    """

    def __init__(
        self, name: str, uri: str | None = None, timeout: float = DEFAULT_TIMEOUT, *, conn: Any = None
    ) -> None:  # QmpConnection.__init__ (a socket connection) is deliberately not called
        self.name = name
        self.uri = uri or configured_uri() or DEFAULT_URI
        self.address = f"libvirt:{self.uri}#{name}"
        self.timeout = timeout
        self._libvirt, self._libvirt_qemu = _libvirt()
        self._own_conn = conn is None
        try:
            self._conn = conn if conn is not None else connect(self.uri)
        except LibvirtError as exc:
            raise QmpError(str(exc)) from None
        self._closed = False
        try:
            self._dom = _lookup(self._conn, name)
            self.domain_xml = self._dom.XMLDesc(0)
        except (LibvirtError, self._libvirt.libvirtError) as exc:
            self.close()
            raise QmpError(str(exc)) from None
        self._targets = disk_targets(self.domain_xml)
        self._owner = qemu_owner(self.domain_xml)
        self._lock_file: Any = None
        try:
            self._lock_domain(timeout)
        except BaseException:
            self.close()
            raise

    def _lock_domain(self, timeout: float) -> None:
        """Hold the domain's surepoint lock while connected: like a QMP socket, which takes one client
        at a time, so a job may take whatever point-in-time view it finds for a dead job's."""
        directory = "/run/surepoint" if os.access("/run", os.W_OK) else tempfile.gettempdir()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"libvirt-{self._dom.UUIDString()}.lock")
        self._lock_file = open(path, "a+b")  # noqa: SIM115 - held until close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QmpTimeout(
                        f"libvirt domain {self.name}: another surepoint connection holds it (lock {path})"
                    ) from None
                time.sleep(0.2)

    def execute_args(self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if self._closed:
            raise QmpError("QMP connection is closed")
        self._grant_paths(command, args or {})
        request: dict[str, Any] = {"execute": command}
        if args:
            request["arguments"] = args
        try:
            text = self._libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps(request), 0)
        except self._libvirt.libvirtError as exc:
            raise QmpError(f"QMP {command} through libvirt ({self.name}): {exc.get_error_message()}") from None
        try:
            reply = json.loads(text)
        except json.JSONDecodeError:
            raise QmpError(f"QMP {command}: libvirt returned no JSON: {text[:200]!r}") from None
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, err.get("class", "?"), err.get("desc", ""))
        return reply.get("return")

    def close(self) -> None:
        """Drop the libvirt connection; the domain keeps running."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        if self._own_conn:
            with contextlib.suppress(Exception):
                self._conn.close()

    def __enter__(self) -> LibvirtQmp:
        return self

    def wait_event(self, name: str, timeout: float | None = None, match: Any = None) -> dict[str, Any]:
        raise QmpError("QMP events are not available through libvirt")

    def events(self) -> list[dict[str, Any]]:
        raise QmpError("QMP events are not available through libvirt")

    def block_devices(self) -> list[BlockDevice]:
        """As QmpConnection.block_devices, with `device` set to the libvirt target (vda) of each disk."""
        devices = []
        for dev in super().block_devices():
            parts = dev.qdev.split("/")  # /machine/peripheral/virtio-disk0/virtio-backend
            alias = parts[3] if dev.qdev.startswith("/machine/peripheral/") and len(parts) > 3 else ""
            target = self._targets.get(alias)
            if target and not dev.device:
                dev = BlockDevice(target, dev.qdev, dev.node_name, dev.driver, dev.size, dev.filename)
            devices.append(dev)
        return devices

    # -- files QEMU is asked to open ----------------------------------------------------------

    def _grant_paths(self, command: str, args: dict[str, Any]) -> None:
        """Give the QEMU user the surepoint-made files QEMU is to open or create (see module doc)."""
        if self._owner is None or os.geteuid() != 0 or self._owner[0] == 0:
            return
        paths = []
        if command == "blockdev-add":
            paths = list(_file_names(args))
        elif command == "nbd-server-start":
            addr = args.get("addr") or {}
            data = addr.get("data", addr)
            if addr.get("type") == "unix" and isinstance(data.get("path"), str):
                paths = [data["path"]]
        for path in paths:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.basename(directory).startswith(OWN_DIR_PREFIX):
                continue
            try:
                if os.stat(directory).st_uid != os.geteuid() and os.stat(directory).st_uid != self._owner[0]:
                    continue
                os.chown(directory, *self._owner)
                if os.path.exists(path):
                    os.chown(path, *self._owner)
            except OSError as exc:
                raise QmpError(f"cannot give {path} to the QEMU user of {self.name}: {exc}") from None


def _file_names(node: Any) -> list[str]:
    """Every filename of a `file` driver in a blockdev-add argument tree."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("driver") == "file" and isinstance(node.get("filename"), str):
            found.append(node["filename"])
        for value in node.values():
            found.extend(_file_names(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_file_names(value))
    return found


# -- guest agent through libvirt ----------------------------------------------------------------


class LibvirtGuestAgent(GuestAgent):
    """qemu-guest-agent of a libvirt domain, through libvirtd (virDomainQemuAgentCommand).

    libvirt holds the agent channel and syncs it before each command; this class has the GuestAgent
    API on top of one `execute`: ping, info, fsfreeze_*, exec/exec_start/exec_status, file_*,
    read_file and write_file. Agent errors lose their error class in libvirt ('libvirt' instead).
    """

    def __init__(
        self, name: str, uri: str | None = None, timeout: float = 10.0, *, conn: Any = None, ping: bool = True
    ) -> None:  # GuestAgent.__init__ (a socket connection) is deliberately not called
        self.name = name
        self.uri = uri or configured_uri() or DEFAULT_URI
        self.path = f"libvirt:{self.uri}#{name}"
        self.timeout = timeout
        self._libvirt, self._libvirt_qemu = _libvirt()
        self._own_conn = conn is None
        try:
            self._conn = conn if conn is not None else connect(self.uri)
        except LibvirtError as exc:
            raise GuestAgentUnavailable(str(exc)) from None
        self._dom: Any = None
        try:
            self._dom = _lookup(self._conn, name)
            if ping:
                self.ping()
        except LibvirtError as exc:
            self.close()
            raise GuestAgentUnavailable(str(exc)) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._dom is None and not self._own_conn:
            return
        self._dom = None
        if self._own_conn:
            self._own_conn = False
            with contextlib.suppress(Exception):
                self._conn.close()

    def __enter__(self) -> LibvirtGuestAgent:
        return self

    def sync(self, timeout: float | None = None) -> None:
        """libvirt syncs the agent channel itself before every command: a ping is enough."""
        self.ping(timeout)

    def execute(self, command: str, args: Any = None, timeout: float | None = None) -> Any:
        if self._dom is None:
            raise GuestAgentError("guest agent connection is closed")
        request: dict[str, Any] = {"execute": command}
        if args:
            request["arguments"] = dict(args)
        wait = self.timeout if timeout is None else timeout
        seconds = max(1, math.ceil(wait))  # libvirt takes whole seconds (0 would mean "do not wait")
        libvirt = self._libvirt
        try:
            text = self._libvirt_qemu.qemuAgentCommand(self._dom, json.dumps(request), seconds, 0)
        except libvirt.libvirtError as exc:
            raise _agent_error(libvirt, command, exc, wait) from None
        try:
            reply = json.loads(text)
        except json.JSONDecodeError:
            raise GuestAgentError(f"guest agent {command}: libvirt returned no JSON: {text[:200]!r}") from None
        if "error" in reply:
            err = reply["error"]
            raise GuestAgentCommandError(command, err.get("class", "?"), err.get("desc", ""))
        return reply.get("return")


def _agent_error(libvirt: Any, command: str, exc: Any, wait: float) -> GuestAgentError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    prefix = f"unable to execute QEMU agent command '{command}': "
    if prefix in message:  # the agent answered with an error (libvirt drops its class)
        return GuestAgentCommandError(command, "libvirt", message.split(prefix, 1)[1])
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and "not connected" in message:
        return GuestAgentUnavailable(f"no guest agent answers in libvirt domain ({message})")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_TIMEOUT):
        return GuestAgentTimeout(f"guest agent did not answer {command} within {wait:g} s ({message})")
    if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
        return GuestAgentUnavailable(message)
    return GuestAgentError(f"guest agent {command} through libvirt: {message}")


# -- what the backup job opens ------------------------------------------------------------------


def open_qmp(vm: VmInfo, timeout: float = DEFAULT_TIMEOUT) -> QmpConnection:
    """QMP to `vm`: through libvirt for a libvirt domain, else its QMP socket."""
    if getattr(vm, "libvirt_uri", None):
        return LibvirtQmp(vm.name, vm.libvirt_uri, timeout)
    return QmpConnection(vm.qmp, timeout)


def open_guest_agent(vm: VmInfo, timeout: float = 10.0) -> GuestAgent:
    """The guest agent of `vm`: through libvirt for a libvirt domain, else its channel socket."""
    if getattr(vm, "libvirt_uri", None):
        return LibvirtGuestAgent(vm.name, vm.libvirt_uri, timeout)
    if not vm.guest_agent:
        raise GuestAgentUnavailable(f"VM {vm.name} has no guest-agent channel")
    return GuestAgent(vm.guest_agent, timeout=timeout)


def domain_metadata(vm: VmInfo) -> dict[str, Any]:
    """What a restore point records of a libvirt domain: its URI and XML (its configuration); {} for other VMs."""
    if not getattr(vm, "libvirt_uri", None):
        return {}
    return {"libvirt_uri": vm.libvirt_uri, "domain_xml": vm.domain_xml}


# -- restore: a domain defined again from its saved XML --------------------------------------------

RUNTIME_ATTRIBUTES = {"domain": ("id",), "target": ("state",), "source": ("index",)}


@dataclass
class RestoredDisk:
    """A disk of a restored domain: its target (vda) and the new image."""

    target: str
    path: str
    format: str


def restored_domain_xml(
    saved_xml: str,
    name: str,
    disks: list[RestoredDisk],
    *,
    new_identity: bool,
    used_macs: set[str] | None = None,
    files_dir: str | None = None,
) -> tuple[str, list[str]]:
    """The saved (live) XML of a domain, made definable again: (XML, notes).

    The name becomes `name`; each disk in `disks` (by target) points to its new image, with the new
    format and no backing chain; what libvirt only adds while a domain runs (id, aliases, dynamic
    security labels, channel and console paths, tap names, autoport ports) goes. With
    `new_identity` (restoring beside the original) the UUID is dropped (libvirt gives a new one) and
    every interface gets a new MAC not in `used_macs`. Files and sockets of character devices (a
    serial console written to a file, a unix socket it listens on) move into `files_dir`, so the
    copy never writes the original's.
    """
    root = ET.fromstring(saved_xml)
    notes: list[str] = []
    for attr in RUNTIME_ATTRIBUTES["domain"]:
        root.attrib.pop(attr, None)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    if new_identity:
        uuid_el = root.find("uuid")
        if uuid_el is not None:
            root.remove(uuid_el)
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":
            for child in list(seclabel):
                if child.tag in ("label", "imagelabel"):
                    seclabel.remove(child)
    devices = root.find("devices")
    if devices is None:
        return ET.tostring(root, encoding="unicode"), notes
    for element in devices.iter():
        alias = element.find("alias")
        if alias is not None:
            element.remove(alias)
        for attr in RUNTIME_ATTRIBUTES.get(element.tag, ()):
            element.attrib.pop(attr, None)
    by_target = {d.target: d for d in disks}
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        new = by_target.pop(dev, None) if dev else None
        if new is None:
            continue
        disk.set("type", "file")
        for child in list(disk):
            if child.tag in ("source", "backingStore", "mirror", "auth", "encryption", "reservations"):
                disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("type", new.format)
        source = ET.Element("source", {"file": new.path})
        disk.insert(list(disk).index(driver) + 1, source)
    for target in by_target:
        notes.append(f"disk {target} is not in the saved domain XML")
    for channel in devices.findall("channel"):  # libvirt makes the path of a unix channel itself
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None and source.get("mode", "bind") == "bind":
            channel.remove(source)
    chardevs = [e for tag in ("serial", "console", "parallel", "channel") for e in devices.findall(tag)]
    for number, element in enumerate(chardevs):
        kind = element.get("type")
        source = element.find("source")
        if kind == "pty" and source is not None:
            element.remove(source)
        elif files_dir is not None and kind in ("file", "unix") and source is not None and source.get("path"):
            ext = "log" if kind == "file" else "sock"
            source.set("path", os.path.join(files_dir, f"{name}-{element.tag}{number}.{ext}"))
        log = element.find("log")
        if files_dir is not None and log is not None and log.get("file"):
            log.set("file", os.path.join(files_dir, f"{name}-{element.tag}{number}-log.log"))
    for graphics in devices.findall("graphics"):
        if graphics.get("autoport") == "yes":
            for attr in ("port", "tlsPort", "websocket"):
                graphics.attrib.pop(attr, None)
        elif graphics.get("port") not in (None, "-1") and new_identity:
            graphics.set("autoport", "yes")
            graphics.attrib.pop("port", None)
            notes.append("graphics: the fixed port of the original is taken; a free one is chosen at start")
    used = {m.lower() for m in used_macs} if used_macs is not None else set()
    for interface in devices.findall("interface"):
        target = interface.find("target")
        kinds = ("network", "bridge", "direct", "ethernet")
        if target is not None and interface.get("type") in kinds and target.get("managed") != "no":
            interface.remove(target)  # vnetN: libvirt names a new tap
        mac = interface.find("mac")
        if new_identity:
            if mac is None:
                mac = ET.SubElement(interface, "mac")
            address = ""
            while not address or address in used:
                address = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
            used.add(address)
            if used_macs is not None:
                used_macs.add(address)
            mac.set("address", address)
    return ET.tostring(root, encoding="unicode"), notes


def domain_exists(conn: Any, name: str | None = None, uuid: str | None = None) -> bool:
    """Whether libvirt at `conn` knows a domain of that name or UUID (running or not)."""
    libvirt, _ = _libvirt()
    try:
        if name is not None:
            conn.lookupByName(name)
        else:
            conn.lookupByUUIDString(uuid)
        return True
    except libvirt.libvirtError:
        return False


def saved_uuid(saved_xml: str) -> str | None:
    element = ET.fromstring(saved_xml).find("uuid")
    return element.text.strip() if element is not None and element.text else None


def saved_name(saved_xml: str) -> str | None:
    element = ET.fromstring(saved_xml).find("name")
    return element.text.strip() if element is not None and element.text else None


def define_domain(conn: Any, xml: str) -> Any:
    """Define (persistently, not started) a domain from `xml`; its virDomain."""
    libvirt, _ = _libvirt()
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt refused the restored domain: {exc.get_error_message()}") from None


def start_domain(dom: Any) -> None:
    libvirt, _ = _libvirt()
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt could not start domain {dom.name()}: {exc.get_error_message()}") from None


def domain_disks(conn: Any, name: str) -> tuple[bool, dict[str, tuple[str, str]]]:
    """(running, {target: (source file, format)}) of the file-backed disks of a defined domain."""
    libvirt, _ = _libvirt()
    try:
        dom = conn.lookupByName(name)
        running = bool(dom.isActive())
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt domain {name!r}: {exc.get_error_message()}") from None
    disks = {}
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        target, source, driver = disk.find("target"), disk.find("source"), disk.find("driver")
        if target is None or source is None or disk.get("device", "disk") != "disk":
            continue
        path = source.get("file") or source.get("dev")
        if path and target.get("dev"):
            disks[target.get("dev")] = (path, driver.get("type", "raw") if driver is not None else "raw")
    return running, disks
