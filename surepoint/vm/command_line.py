"""The one place that rewrites a saved QEMU command line so the VM can run somewhere else.

Every consumer of a saved command line (`vm restore`, instant recovery, the recovery lab,
replication and failover) calls `rewrite`:

    result = rewrite(
        saved_argv,
        name="web01-restored",
        workdir="/srv/vms/web01-restored",             # sockets, pidfile, logs go here
        disks=disk_maps(point_vm["disks"], new_paths, "qcow2"),
        network=NetworkMap.parse("user"),              # keep | none | user | tap:NAME | bridge:NAME
        macs="new",                                    # keep | new | unique (with used_macs)
        uuid="new",                                    # None keeps -uuid; "new" or a UUID replaces it
    )
    result.argv          # start this (never daemonizes: the process started is QEMU itself)
    result.daemon_argv() # the same with -daemonize and -pidfile, for a start script
    result.qmp, result.guest_agent, result.pidfile, result.nics, result.notes, result.missing_disks

What it does to the command line:

* Disks: a `-drive file=...`, `-blockdev` (key=value or JSON, a protocol node on its own or
  nested under its format node, referenced by node name or inline), or `-hda`..`-hdd` whose
  file is one of `disks` gets the new path and format. When the format changes, options only
  qcow2 knows are dropped, and so is `backing` (a restored image is whole; an overlay names its
  backing file itself). A raw protocol node attached straight to a device becomes a format node
  when the new image is not raw. Paths are compared after normalisation; mapped files that are
  not found are listed in `missing_disks`, file names not mapped are left as they are.
* Sockets and files QEMU makes, moved into `workdir`: `-qmp` (qmp.sock), `-monitor`
  (monitor.sock), `-serial`/`-parallel` (console.log, or serialN.sock for a socket), server
  `-chardev socket` (path=, host/port= or an inherited fd=) to ID.sock, `-chardev file` to ID.log,
  `-pidfile` (qemu.pid), `-D` (qemu-debug.log), `-vnc`/`-display vnc=` to a unix socket vnc.sock,
  `-spice` to spice.sock. stdio, pty, null, none and client sockets are left alone.
* `-daemonize` is removed from `argv` (`daemonize` tells whether the saved line had it): a caller
  that starts QEMU and watches the process needs QEMU itself, not a parent that exits at once.
  `-incoming` and `-loadvm` are dropped (a restored VM boots, it does not wait for a migration or
  load a snapshot its new image does not have), `-add-fd` too (the descriptors belonged to the
  process that started the original).
* `-name` (guest= and process= too) becomes `name`; `-uuid` is replaced when `uuid` is given.
* Network (`NetworkMap`): `keep` leaves the backends (except inherited fd= taps, which become
  user networking, with a note); `user` makes every backend user-mode networking; `tap` a tap
  each (a name, for one backend, or a function giving a new name per backend); `bridge` a bridge
  backend on the given bridge; `none` drops the backends and leaves the guest's NICs unplugged.
  Each guest NIC keeps its frontend (model, PCI address, so its name in the guest). `-nic TYPE`
  keeps model=, mac= and id=. Without any network option and without -nodefaults, QEMU would add a
  default NIC: it is made explicit (except for `keep` with kept MACs). The legacy `-net` is refused
  unless the network is kept.
* MACs: `keep` leaves them; `new` gives every NIC a new 52:54:00:xx:xx:xx (restoring beside the
  original); `unique` keeps the saved MAC unless `used_macs` holds it (several VMs on one network).
  With `new` and `unique` every NIC gets an explicit MAC and `used_macs` receives it.

QEMU's key=value syntax is kept exactly (a `,,` is an escaped comma inside a value); JSON option
values stay JSON.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid as uuid_module
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from surepoint.errors import InvalidArgument

GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
FORMATS = ("qcow2", "raw")

# QEMU options that take no value (everything else takes exactly one)
NO_VALUE = frozenset(
    [
        "-daemonize",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-no-shutdown",
        "-enable-kvm",
        "-S",
        "-s",
        "-snapshot",
        "-nographic",
        "-no-hpet",
        "-no-acpi",
        "-full-screen",
        "-no-fd-bootchk",
        "-win2k-hack",
        "-rtc-td-hack",
        "-usb",
        "-only-migratable",
        "-preconfig",
        "-enable-fips",
        "-no-quit",
        "-alt-grab",
        "-ctrl-grab",
        "-no-frame",
        "-nodefconfig",
        "-version",
        "-help",
        "-h",
        "-enable-sync-profile",
        "-old-param",
        "-semihosting",
        "-no-kvm",
        "-no-kvm-irqchip",
        "-curses",
        "-sdl",
        "-portrait",
        "-singlestep",
    ]
)
DROPPED_WITH_VALUE = {
    "-incoming": "the VM boots instead of waiting for an incoming migration",
    "-loadvm": "the restored image has no internal snapshots to load",
    "-add-fd": "file descriptors passed to the original QEMU do not exist here",
}
# options only the qcow2 format driver knows (dropped when a disk becomes raw)
QCOW2_ONLY = frozenset(
    [
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-clean-interval",
        "lazy-refcounts",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "overlap-check",
        "data-file",
        "encrypt",
        "discard-no-unref",
    ]
)
PROTOCOL_DRIVERS = ("file", "host_device", "host_cdrom")
NIC_DRIVERS = frozenset(
    [
        "virtio-net-pci",
        "virtio-net",
        "virtio-net-device",
        "virtio-net-pci-transitional",
        "virtio-net-pci-non-transitional",
        "e1000",
        "e1000-82540em",
        "e1000-82544gc",
        "e1000-82545em",
        "e1000e",
        "igb",
        "rtl8139",
        "vmxnet3",
        "ne2k_pci",
        "ne2k_isa",
        "pcnet",
        "i82550",
        "i82551",
        "i82557a",
        "i82557b",
        "i82557c",
        "i82558a",
        "i82558b",
        "i82559a",
        "i82559b",
        "i82559c",
        "i82559er",
        "i82562",
        "i82801",
        "usb-net",
        "tulip",
    ]
)
TAKEN_BY_FD = ("fd", "fds", "vhostfd", "vhostfds")


# ---- the public API -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskMap:
    """One disk: the file the saved command line names, the file to use instead, and its format."""

    old: str
    new: str
    format: str | None = None  # None keeps the format the command line gives


def disk_maps(saved_disks: Iterable[dict], new_paths: Iterable[str], disk_format: str | None) -> list[DiskMap]:
    """DiskMaps from a restore point's VM metadata (`disks`, each with `filename`) and the new paths."""
    return [
        DiskMap(d["filename"], p, disk_format) for d, p in zip(saved_disks, new_paths, strict=True) if d.get("filename")
    ]


@dataclass
class NetworkMap:
    """Where the guest's NICs go: keep, none, user, tap (`tap`: a name or a new-name function) or
    bridge (`bridge`: its name)."""

    mode: str = "keep"
    tap: str | Callable[[], str] | None = None
    bridge: str | None = None

    MODES = ("keep", "none", "user", "tap", "bridge")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise InvalidArgument(f"network {self.mode!r}: use keep, none, user, tap:NAME or bridge:NAME")
        if self.mode == "tap" and not self.tap:
            raise InvalidArgument("network tap needs a tap name (tap:NAME)")
        if self.mode == "bridge" and not self.bridge:
            raise InvalidArgument("network bridge needs a bridge name (bridge:NAME)")

    @classmethod
    def parse(cls, text: str) -> NetworkMap:
        """`keep`, `none`, `user`, `tap:NAME` or `bridge:NAME` (as a user writes it on a command line)."""
        mode, _, arg = text.strip().partition(":")
        if mode == "tap":
            return cls("tap", tap=arg or None)
        if mode == "bridge":
            return cls("bridge", bridge=arg or None)
        if arg:
            raise InvalidArgument(f"network {text!r}: use keep, none, user, tap:NAME or bridge:NAME")
        return cls(mode)


@dataclass
class Nic:
    """One guest NIC after the rewrite: its backend's id, tap (if any) and the MAC the guest sees."""

    netdev_id: str | None  # id of the -netdev (None for -nic)
    tap: str | None  # the tap behind it, for the tap network
    mac: str | None  # the MAC the guest will see, lower case (None: QEMU's default, kept)
    original_mac: str | None  # MAC in the saved command line
    mac_changed: bool  # a new MAC was given (asked for, taken by another VM, or none was set)


@dataclass
class Rewritten:
    """A rewritten command line and what a caller needs to run and reach it."""

    argv: list[str]
    workdir: str
    qmp: str | None = None  # unix socket path of the (first) QMP monitor
    guest_agent: str | None = None  # unix socket path of the guest-agent channel
    pidfile: str | None = None
    daemonize: bool = False  # the saved command line had -daemonize (removed from argv)
    nics: list[Nic] = field(default_factory=list)
    disks: dict[str, str] = field(default_factory=dict)  # old file -> new file, for each disk found
    missing_disks: list[str] = field(default_factory=list)  # mapped files the command line does not name
    files: list[str] = field(default_factory=list)  # sockets, logs and pidfile QEMU makes in workdir
    notes: list[str] = field(default_factory=list)  # what was changed beyond the plain rewrite, for the user

    def daemon_argv(self) -> list[str]:
        """`argv` with -daemonize and a -pidfile in workdir, for a start script of a daemonizing VM."""
        argv = list(self.argv)
        if "-pidfile" not in argv:
            argv += ["-pidfile", os.path.join(self.workdir, "qemu.pid")]
        return [*argv, "-daemonize"]


def rewrite(
    argv: list[str],
    *,
    name: str,
    workdir: str,
    disks: Iterable[DiskMap] = (),
    network: NetworkMap | None = None,
    macs: str = "keep",
    used_macs: set[str] | None = None,
    uuid: str | None = None,
) -> Rewritten:
    """The saved QEMU command line `argv` rewritten to run as `name` with its files in `workdir`."""
    if macs not in ("keep", "new", "unique"):
        raise InvalidArgument(f"macs {macs!r}: keep, new or unique")
    if uuid == "new":
        uuid = str(uuid_module.uuid4())
    workdir = os.path.abspath(workdir)
    maps = list(disks)
    for m in maps:
        if m.format is not None and m.format not in FORMATS:
            raise InvalidArgument(f"a disk is qcow2 or raw, not {m.format!r}")
    state = _State(workdir, maps)
    words = _words(argv)
    state.referenced = _referenced_nodes(words)
    out: list[str] = []
    for flag, value in words:
        key = _flag(flag)
        if value is None:
            if key == "-daemonize":
                state.result.daemonize = True
                continue
            out.append(flag)
            continue
        if key in DROPPED_WITH_VALUE:
            state.result.notes.append(f"dropped {key} {value}: {DROPPED_WITH_VALUE[key]}")
            continue
        new_value = _rewrite_option(key, value, name, uuid, state)
        if new_value is None:
            continue
        if isinstance(new_value, list):  # an option replaced by several words
            out += new_value
        else:
            out += [flag, new_value]
    out = _rewrite_network(out, network or NetworkMap(), macs, used_macs if used_macs is not None else set(), state)
    state.result.argv = out
    state.result.missing_disks = [m.old for m in maps if m.old not in state.result.disks]
    if state.result.qmp is None:
        state.result.qmp = next((state.chardevs[m] for m in state.monitors if m in state.chardevs), None)
    if state.agent_chardev:
        state.result.guest_agent = state.chardevs.get(state.agent_chardev)
    return state.result


def rewrite_network(argv: list[str], network: NetworkMap, used_macs: set[str], *, macs: str = "unique") -> Rewritten:
    """Only the network part of `rewrite`: backends onto `network`, MACs by `macs` (default: unique
    among `used_macs`). Everything else in `argv` stays as it is."""
    state = _State(os.getcwd(), [])
    state.result.argv = _rewrite_network(list(argv), network, macs, used_macs, state)
    return state.result


# ---- words of a command line --------------------------------------------------------------------


def _flag(arg: str) -> str:
    return arg[1:] if arg.startswith("--") else arg  # QEMU takes --netdev as -netdev


def _words(argv: list[str]) -> list[tuple[str, str | None]]:
    """(word, value) pairs: a flag and its value, or a word alone (the binary, a flag without value)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and _flag(word) not in NO_VALUE and i + 1 < len(argv):
            pairs.append((word, argv[i + 1]))
            i += 2
        else:
            pairs.append((word, None))
            i += 1
    return pairs


def split_options(value: str) -> list[str]:
    """QEMU's key=value list split at single commas; ',,' (an escaped comma) stays inside its part."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == "," and value[i + 1 : i + 2] == ",":
            current.append(",,")
            i += 2
        elif value[i] == ",":
            parts.append("".join(current))
            current = []
            i += 1
        else:
            current.append(value[i])
            i += 1
    parts.append("".join(current))
    return parts


def _key(part: str) -> str | None:
    return part.split("=", 1)[0] if "=" in part else None


def _unescape(text: str) -> str:
    return text.replace(",,", ",")


def _escape(value: str) -> str:
    return value.replace(",", ",,")


def _is_json(value: str) -> bool:
    return value.lstrip().startswith("{")


class _Options:
    """A key=value option string, edited in place with its order and escapes kept."""

    def __init__(self, value: str, implied: str | None = None) -> None:
        self.parts = split_options(value)
        self.implied = implied  # the key of a leading bare word (type, driver, backend)

    def get(self, key: str) -> str | None:
        found = None
        for n, part in enumerate(self.parts):
            k = _key(part)
            if k == key:
                found = _unescape(part.split("=", 1)[1])
            elif k is None and n == 0 and key == self.implied and part:
                found = _unescape(part)
        return found

    def names(self) -> list[str]:
        return [k for k in (_key(p) for p in self.parts) if k is not None]

    def set(self, key: str, value: str) -> None:
        text = f"{key}={_escape(value)}"
        for n, part in enumerate(self.parts):
            if _key(part) == key or (n == 0 and _key(part) is None and key == self.implied and part):
                self.parts[n] = _escape(value) if _key(part) is None else text
                return
        self.parts.append(text)

    def drop(self, *keys: str, prefixes: tuple[str, ...] = ()) -> None:
        self.parts = [
            p
            for p in self.parts
            if not (_key(p) in keys or any((_key(p) or "").startswith(pre) for pre in prefixes))
            and not (_key(p) is None and p in keys)
        ]

    def text(self) -> str:
        return ",".join(self.parts)


# ---- everything but the network -----------------------------------------------------------------


@dataclass
class _State:
    workdir: str
    maps: list[DiskMap]
    result: Rewritten = field(init=False)
    used_names: set[str] = field(default_factory=set)
    chardevs: dict[str, str] = field(default_factory=dict)  # chardev id -> unix socket path
    monitors: list[str] = field(default_factory=list)  # chardev ids of QMP monitors
    agent_chardev: str | None = None
    blockdev_protocols: dict[str, DiskMap] = field(default_factory=dict)  # protocol node name -> its disk
    referenced: set[str] = field(default_factory=set)  # node names other -blockdev nodes use as `file`

    def __post_init__(self) -> None:
        self.result = Rewritten([], self.workdir)

    def path(self, base: str, ext: str) -> str:
        """A new file name in workdir (base.ext, base-1.ext...)."""
        name, n = f"{base}.{ext}", 1
        while name in self.used_names:
            name, n = f"{base}-{n}.{ext}", n + 1
        self.used_names.add(name)
        path = os.path.join(self.workdir, name)
        self.result.files.append(path)
        return path

    def disk_for(self, filename: str | None) -> DiskMap | None:
        if not filename:
            return None
        for m in self.maps:
            if _same_file(m.old, filename):
                self.result.disks[m.old] = m.new
                return m
        return None


def _same_file(a: str, b: str) -> bool:
    if a == b or os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:40] or "chardev"


def _referenced_nodes(words: list[tuple[str, str | None]]) -> set[str]:
    """Node names that a -blockdev names as its `file` (the protocol nodes under a format node)."""
    names = set()
    for flag, value in words:
        if _flag(flag) != "-blockdev" or value is None:
            continue
        child = _json(value, "-blockdev").get("file") if _is_json(value) else _Options(value).get("file")
        if isinstance(child, str):
            names.add(child)
    return names


def _rewrite_option(key: str, value: str, name: str, uuid: str | None, state: _State) -> str | list[str] | None:
    """The new value of one option (a list: replaced by these words; None: dropped)."""
    if key == "-name":
        return _name(value, name)
    if key == "-uuid":
        return uuid or value
    if key == "-pidfile":
        path = state.path("qemu", "pid")
        state.result.pidfile = path
        return path
    if key == "-D":
        return state.path("qemu-debug", "log")
    if key == "-qmp":
        return _legacy_char(value, "qmp", state, monitor=True)
    if key == "-monitor":
        return _legacy_char(value, "monitor", state)
    if key in ("-serial", "-parallel"):
        return _legacy_char(value, "console" if key == "-serial" else "parallel", state)
    if key == "-chardev":
        return _chardev(value, state)
    if key == "-mon":
        opts = _Options(value)
        if opts.get("mode") == "control" and opts.get("chardev"):
            state.monitors.append(opts.get("chardev") or "")
        return value
    if key == "-device":
        if not _is_json(value):
            opts = _Options(value, "driver")
            if opts.get("driver") == "virtserialport" and opts.get("name") == GUEST_AGENT_PORT:
                state.agent_chardev = opts.get("chardev")
        else:
            obj = _json(value, key)
            if obj.get("driver") == "virtserialport" and obj.get("name") == GUEST_AGENT_PORT:
                state.agent_chardev = obj.get("chardev")
        return value
    if key == "-drive":
        return _drive(value, state)
    if key == "-blockdev":
        return _blockdev(value, state)
    if key in ("-hda", "-hdb", "-hdc", "-hdd"):
        disk = state.disk_for(value)
        if disk is None:
            return value
        index = "abcd".index(key[-1])
        fmt = f",format={disk.format}" if disk.format else ""
        return ["-drive", f"file={_escape(disk.new)}{fmt},index={index},media=disk"]
    if key == "-vnc":
        return _vnc(value, state)
    if key == "-display" and value.startswith("vnc="):
        return "vnc=" + _vnc(value[4:], state)
    if key == "-spice":
        opts = _Options(value)
        if opts.get("unix") not in ("on", "yes") and (opts.get("port") or opts.get("tls-port")):
            opts.drop("port", "tls-port", "addr", "ipv4", "ipv6")
            opts.set("unix", "on")
            opts.set("addr", state.path("spice", "sock"))
        return opts.text()
    return value


def _name(value: str, name: str) -> str:
    opts = _Options(value, "guest")
    opts.set("guest", name)
    if opts.get("process") is not None:
        opts.set("process", name)
    return opts.text()


def _vnc(value: str, state: _State) -> str:
    parts = split_options(value)
    if parts[0] in ("none", ""):
        return value
    kept = [p for p in parts[1:] if _key(p) not in ("websocket", "to", "reverse", "ipv4", "ipv6")]
    return ",".join([f"unix:{state.path('vnc', 'sock')}", *kept])


def _legacy_char(value: str, base: str, state: _State, *, monitor: bool = False) -> str:
    """-qmp/-monitor/-serial/-parallel in their short form: sockets and files move into workdir."""
    if value.startswith("mon:"):
        return "mon:" + _legacy_char(value[4:], base, state)
    kind = value.split(":", 1)[0]
    if kind in ("unix", "tcp", "telnet", "websocket"):
        path = state.path(base, "sock")
        if monitor and state.result.qmp is None:
            state.result.qmp = path
        return f"unix:{path},server=on,wait=off"
    if kind == "file":
        return f"file:{state.path(base, 'log')}"
    return value  # stdio, pty, vc, null, none, chardev:ID


def _chardev(value: str, state: _State) -> str:
    if _is_json(value):
        return value
    opts = _Options(value, "backend")
    backend = opts.get("backend")
    chardev_id = opts.get("id") or "chardev"
    if backend == "socket":
        server = opts.get("server")
        is_server = server is not None and server not in ("off", "no", "false") or "server" in opts.parts
        if not is_server and opts.get("fd") is None:
            return value  # a client: it connects to something outside this VM
        path = state.path(_safe_id(chardev_id), "sock")
        opts.drop("path", "host", "port", "to", "ipv4", "ipv6", "fd", "abstract", "tight")
        opts.set("path", path)
        if opts.get("server") is None and "server" not in opts.parts:
            opts.set("server", "on")
        if opts.get("wait") is None and "nowait" not in opts.parts:
            opts.set("wait", "off")
        state.chardevs[chardev_id] = path
        return opts.text()
    if backend == "file":
        opts.set("path", state.path(_safe_id(chardev_id), "log"))
        return opts.text()
    return value


# ---- disks --------------------------------------------------------------------------------------


def _drive(value: str, state: _State) -> str:
    opts = _Options(value)
    key = "file" if opts.get("file") is not None else "file.filename"
    disk = state.disk_for(opts.get(key))
    if disk is None:
        return value
    opts.set(key, disk.new)
    if disk.format is not None and disk.format != opts.get("format"):
        if disk.format != "qcow2":
            opts.drop(*QCOW2_ONLY, prefixes=("encrypt.",))
        opts.drop(prefixes=("backing.",))
        opts.set("format", disk.format)
    if opts.get("file.driver") == "host_device":
        opts.set("file.driver", "file")
    return opts.text()


def _blockdev(value: str, state: _State) -> str:
    as_json = _is_json(value)
    tree = _json(value, "-blockdev") if as_json else _nest(_Options(value))
    changed, disk = _rewrite_node(tree, state)
    if disk is not None and disk.format not in (None, "raw") and tree.get("node-name") not in state.referenced:
        # a protocol node on its own: put the format on top of it, under the same node name
        proto = dict(tree)
        node_name = proto.pop("node-name", None)
        tree = {"driver": disk.format, **({"node-name": node_name} if node_name else {}), "file": proto}
        changed = True
    if not changed:
        return value
    return json.dumps(tree) if as_json else ",".join(_flatten(tree))


def _rewrite_node(node: dict[str, Any], state: _State) -> tuple[bool, DiskMap | None]:
    """Rewrite a blockdev node tree; (changed, disk) where disk is set when `node` itself is a
    protocol node of a mapped disk (its caller decides about the format layer)."""
    if node.get("driver") in PROTOCOL_DRIVERS:
        disk = state.disk_for(node.get("filename"))
        if disk is None:
            return False, None
        node["filename"] = disk.new
        node["driver"] = "file"
        if node.get("node-name"):
            state.blockdev_protocols[str(node["node-name"])] = disk
        return True, disk
    child = node.get("file")
    disk = None
    changed = False
    if isinstance(child, dict):
        changed, disk = _rewrite_node(child, state)
    elif isinstance(child, str):
        disk = state.blockdev_protocols.get(child)
    if disk is not None and disk.format is not None and node.get("driver") != disk.format:
        node["driver"] = disk.format
        if disk.format != "qcow2":
            for key in [k for k in node if k in QCOW2_ONLY or k.startswith("encrypt")]:
                del node[key]
        changed = True
    if disk is not None and "backing" in node:
        del node["backing"]
        changed = True
    return changed, None


def _nest(opts: _Options) -> dict[str, Any]:
    """A flat key=value blockdev (file.filename=...) as a nested dict."""
    tree: dict[str, Any] = {}
    for part in opts.parts:
        key = _key(part)
        if key is None:
            continue
        value = _unescape(part.split("=", 1)[1])
        *path, last = key.split(".")
        node = tree
        for step in path:
            node = node.setdefault(step, {})
            if not isinstance(node, dict):
                raise InvalidArgument(f"the saved command line has a -blockdev with {key} under a string value")
        node[last] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    parts = []
    for key, value in tree.items():
        if isinstance(value, dict):
            parts += _flatten(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            parts.append(f"{prefix}{key}={_escape(text)}")
    return parts


def _json(value: str, flag: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"the saved command line has an invalid JSON {flag} ({value}): {e}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"the saved command line has an invalid JSON {flag} ({value})")
    return obj


# ---- the network --------------------------------------------------------------------------------


def _net_opts(value: str, flag: str) -> dict[str, str]:
    """Options of a -netdev/-device/-nic value, unescaped; the type or driver under "type"/"driver"."""
    if _is_json(value):
        return {k: v for k, v in _json(value, flag).items() if isinstance(v, str)}
    opts = _Options(value, "driver" if flag == "-device" else "type")
    found = {k: opts.get(k) or "" for k in opts.names()}
    first = opts.parts[0]
    if _key(first) is None and first:
        found["driver" if flag == "-device" else "type"] = _unescape(first)
    return found


def _is_nic(opts: dict[str, str]) -> bool:
    return bool(opts.get("netdev")) or opts.get("driver", "") in NIC_DRIVERS


def _rewrite_network(argv: list[str], network: NetworkMap, macs: str, used_macs: set[str], state: _State) -> list[str]:
    words = _words(argv)
    nets = [(n, _flag(w), v) for n, (w, v) in enumerate(words) if v is not None]
    nets = [(n, f, v) for n, f, v in nets if f in ("-net", "-netdev", "-nic", "-device")]
    mode = network.mode
    # MACs written in this command line: a new MAC must not take one that another NIC keeps
    saved_here: set[str] = set()
    frontends: dict[str, str | None] = {}  # netdev id -> MAC saved on its -device (one NIC per netdev)
    for _n, flag, value in nets:
        if flag == "-net" and value.strip() != "none" and mode != "keep":
            raise InvalidArgument(
                f"the saved command line uses the legacy -net option ({value}); it cannot be put on another "
                "network: describe the NIC with -netdev/-device or -nic"
            )
        if flag in ("-device", "-nic"):
            opts = _net_opts(value, flag)
            if flag == "-device" and not _is_nic(opts):
                continue
            if opts.get("mac"):
                saved_here.add(opts["mac"].lower())
            if flag == "-device" and opts.get("netdev"):
                frontends.setdefault(opts["netdev"], opts.get("mac"))
    taken = {m.lower() for m in used_macs}
    new_tap = _tap_source(network)
    nics = state.result.nics

    def plan(netdev_id: str | None, saved: str | None, tap: str | None) -> Nic:
        mac, changed = _choose_mac(saved, macs, taken, saved_here)
        if mac is not None:
            used_macs.add(mac)
        nic = Nic(netdev_id, tap, mac, saved.lower() if saved else None, changed)
        nics.append(nic)
        return nic

    # backends first, in command-line order (tap names follow it); then the NICs that use them,
    # which QEMU allows anywhere on the line, also before their -netdev
    replaced: dict[int, list[str] | None] = {}
    for n, flag, value in nets:
        if flag == "-netdev":
            replaced[n] = _netdev(words[n][0], value, network, frontends, plan, new_tap, state)
        elif flag == "-nic":
            replaced[n] = _nic(words[n][0], value, network, plan, new_tap)
    by_netdev = {nic.netdev_id: nic for nic in nics if nic.netdev_id is not None}
    for n, flag, value in nets:
        if flag == "-device":
            opts = _net_opts(value, flag)
            if _is_nic(opts):
                nic = by_netdev.get(opts.get("netdev") or "")
                if nic is None and not opts.get("netdev"):
                    nic = plan(None, opts.get("mac"), None)  # a NIC without backend: only its MAC
                if nic is not None and (nic.mac_changed or mode == "none"):
                    replaced[n] = [words[n][0], _device(value, nic, unplug=mode == "none")]
    out: list[str] = []
    for n, (word, value) in enumerate(words):
        if n in replaced:
            out += replaced[n] or []
        else:
            out += [word] if value is None else [word, value]
    has_net = any(f in ("-net", "-netdev", "-nic") for _n, f, _v in nets)
    if not has_net and "-nodefaults" not in map(_flag, argv) and (mode != "keep" or macs == "new"):
        # QEMU's default NIC, made explicit
        if mode == "none":
            out += ["-nic", "none"]
        else:
            out += _nic("-nic", "user", network, plan, new_tap) or []
    elif mode == "none" and "-nodefaults" not in map(_flag, argv):
        out += ["-nic", "none"]
    return out


def _tap_source(network: NetworkMap) -> Callable[[], str]:
    if callable(network.tap):
        return network.tap
    given = [network.tap]

    def one_tap() -> str:
        if not given:
            raise InvalidArgument(
                f"one tap ({network.tap}) for several network backends: give a bridge instead, or one backend per VM"
            )
        return str(given.pop())

    return one_tap


def _backend(network: NetworkMap, netdev_id: str | None, tap: str | None, as_json: bool) -> str:
    """A new backend of the network's kind: -netdev value (with id) or -nic value (without)."""
    if network.mode == "tap":
        fields = {"type": "tap", "id": netdev_id, "ifname": tap, "script": "no", "downscript": "no"}
    elif network.mode == "bridge":
        fields = {"type": "bridge", "id": netdev_id, "br": network.bridge}
    else:
        fields = {"type": "user", "id": netdev_id}
    fields = {k: v for k, v in fields.items() if v is not None}
    if as_json:
        return json.dumps(fields)
    return ",".join([str(fields.pop("type")), *(f"{k}={_escape(str(v))}" for k, v in fields.items())])


def _netdev(
    word: str,
    value: str,
    network: NetworkMap,
    frontends: dict[str, str | None],
    plan: Callable[[str | None, str | None, str | None], Nic],
    new_tap: Callable[[], str],
    state: _State,
) -> list[str] | None:
    opts = _net_opts(value, "-netdev")
    netdev_id = opts.get("id")
    if not netdev_id:
        raise InvalidArgument(f"the saved command line has a -netdev without id ({value})")
    mode = network.mode
    has_nic = netdev_id in frontends
    if mode == "none":
        if has_nic:
            plan(netdev_id, frontends[netdev_id], None)
        return None
    if mode == "keep":
        if any(opts.get(k) for k in TAKEN_BY_FD):
            state.result.notes.append(
                f"network {netdev_id}: the saved backend used file descriptors of the original QEMU; "
                "it is user-mode networking now"
            )
            value = _backend(NetworkMap("user"), netdev_id, None, _is_json(value))
        if has_nic:
            plan(netdev_id, frontends[netdev_id], opts.get("ifname") if opts.get("type") == "tap" else None)
        return [word, value]
    # a -netdev no NIC uses (QEMU only warns) still gets a new backend: no old one may survive
    tap = new_tap() if mode == "tap" else None
    if has_nic:
        plan(netdev_id, frontends[netdev_id], tap)
    return [word, _backend(network, netdev_id, tap, _is_json(value))]


def _device(value: str, nic: Nic, *, unplug: bool) -> str:
    if _is_json(value):
        obj = json.loads(value)
        if nic.mac is not None:
            obj["mac"] = nic.mac
        if unplug:
            obj.pop("netdev", None)
        return json.dumps(obj)
    drop = (["mac"] if nic.mac is not None else []) + (["netdev"] if unplug else [])
    parts = [p for p in split_options(value) if _key(p) not in drop]
    return ",".join(parts + ([f"mac={nic.mac}"] if nic.mac is not None else []))


def _nic(
    word: str,
    value: str,
    network: NetworkMap,
    plan: Callable[[str | None, str | None, str | None], Nic],
    new_tap: Callable[[], str],
) -> list[str] | None:
    parts = split_options(value)
    opts = _net_opts(value, "-nic")
    if opts.get("type") == "none":
        return [word, value]
    if network.mode == "none":
        return None
    if network.mode == "keep":
        nic = plan(None, opts.get("mac"), None)
        if nic.mac is None or nic.mac == (opts.get("mac") or "").lower():
            return [word, value]
        return [word, ",".join([*(p for p in parts if _key(p) != "mac"), f"mac={nic.mac}"])]
    kept = [p for p in parts if _key(p) in ("model", "id")]
    tap = new_tap() if network.mode == "tap" else None
    nic = plan(None, opts.get("mac"), tap)
    mac = [f"mac={nic.mac}"] if nic.mac is not None else []
    return [word, ",".join([_backend(network, None, tap, False), *kept, *mac])]


def _choose_mac(saved: str | None, macs: str, taken: set[str], avoid: set[str]) -> tuple[str | None, bool]:
    saved = saved.lower() if saved else None
    if macs == "keep":
        return saved, False
    if macs == "unique" and saved and saved not in taken:
        taken.add(saved)
        return saved, False
    mac = ""
    while not mac or mac in taken or mac in avoid or mac == saved:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
    taken.add(mac)
    return mac, True
