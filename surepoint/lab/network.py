"""The lab's isolated network: a Linux network namespace with one bridge, and VMs attached to it by tap.

A lab VM runs inside the namespace (`ip netns exec NS qemu-system-x86_64 ...`, see
`LabNetwork.command_prefix`). The namespace has a loopback, the bridge `BRIDGE` carrying the lab's
addresses, and one tap per guest NIC on that bridge, and nothing else: no veth pair, no route, no
uplink. Whatever a guest or QEMU itself tries (slirp, a TCP chardev, a listening VNC) can only reach
the namespace, so a VM booted from a backup cannot talk to production. With `isolated=False` (the
lab's network "none") the taps exist, so QEMU starts, but no bridge joins them: every NIC is alone.

Taps are created before QEMU starts, in plain mode (one queue, no vnet_hdr flag). Checked with QEMU
7.2: `-netdev tap,ifname=tapN,script=no,downscript=no` opens such a persistent tap and sets the
vnet_hdr flag itself (the kernel lets an open change it); the tap shows LOWER_UP while QEMU holds it.
What does not fit a plain tap is `queues=N` (the kernel refuses to open a single-queue tap as multi
queue) and `vhost=on` where /dev/vhost-net is missing; `attach_to_lab` drops every old backend
option, so neither reaches QEMU. The bridge gets a fixed MAC so it does not change its address (and
stale guest ARP entries for it) each time a tap joins.

`attach_to_lab` is the pure part: it rewrites a saved QEMU command line so that every network
backend is a tap of the lab, each guest NIC keeps its frontend (device model, PCI address, hence
its interface name in the guest) and gets a MAC unique among the lab's VMs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import InvalidArgument, TargetError

NAMESPACE_PREFIX = "surepoint-lab-"
BRIDGE = "splab0"
LAB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
IP_TIMEOUT = 30.0
TAP_ATTEMPTS = 8


def namespace_for(lab_id: str) -> str:
    """The namespace name of a lab: NAMESPACE_PREFIX + lab_id (lower-case letters, digits, '-'; at most 32)."""
    if not LAB_ID.fullmatch(lab_id):
        raise InvalidArgument(f"invalid lab id {lab_id!r}: use 1-32 lower-case letters, digits and '-'")
    return NAMESPACE_PREFIX + lab_id


def list_lab_namespaces() -> list[str]:
    """The lab namespaces that exist on this host (also those of crashed labs), sorted."""
    return sorted(name for name in _all_namespaces() if name.startswith(NAMESPACE_PREFIX))


@dataclass
class LabNetwork:
    """A network namespace with one bridge: the lab's isolated network."""

    namespace: str
    addresses: list[str] = field(default_factory=list)  # CIDR addresses of the bridge, e.g. ["10.0.2.2/24"]
    isolated: bool = True  # False = network "none": taps exist but no bridge/addresses

    @classmethod
    def create(cls, namespace: str, addresses: list[str], *, isolated: bool = True) -> LabNetwork:
        """Create the namespace, bring up its loopback and (if isolated) the bridge with `addresses`.

        Raises TargetError if the namespace exists already (it is left alone). If a later step fails,
        the new namespace is deleted again before the error is raised.
        """
        _check_namespace(namespace)
        interfaces = [_interface(a) for a in addresses]
        if interfaces and not isolated:
            raise InvalidArgument('lab addresses make no sense without the bridge (network "none")')
        if cls.exists(namespace):
            raise TargetError(f"network namespace {namespace} exists already (another lab, or one left behind)")
        _ip(["netns", "add", namespace], f"cannot create network namespace {namespace}")
        lab = cls(namespace, [str(i) for i in interfaces], isolated)
        try:
            lab._ip(["link", "set", "lo", "up"], "cannot bring up its loopback")
            if isolated:
                bridge_mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
                lab._ip(["link", "add", "name", BRIDGE, "address", bridge_mac, "type", "bridge"], "cannot add bridge")
                for interface in interfaces:
                    # no duplicate address detection: nobody else is on this network, and lab services
                    # should be able to bind the address at once
                    extra = ["nodad"] if interface.version == 6 else []
                    lab._ip(["addr", "add", str(interface), "dev", BRIDGE, *extra], f"cannot add address {interface}")
                lab._ip(["link", "set", BRIDGE, "up"], "cannot bring up the bridge")
        except BaseException:
            lab.destroy()
            raise
        return lab

    def add_tap(self) -> str:
        """Create the next tap (tap0, tap1, ...) in the namespace, on the bridge if isolated, up; its name.

        The tap is persistent and plain (one queue, no vnet_hdr): QEMU opens it with
        `-netdev tap,ifname=NAME,script=no,downscript=no`.
        """
        for _ in range(TAP_ATTEMPTS):
            numbers = [int(m[1]) for name in self._links() if (m := re.fullmatch(r"tap(\d+)", name))]
            name = f"tap{max(numbers, default=-1) + 1}"
            try:
                self._ip(["tuntap", "add", name, "mode", "tap"], f"cannot create tap {name}")
            except TargetError:
                if name in self._links():
                    continue  # another process took the name in between: take the next one
                raise
            try:
                if self.isolated:
                    self._ip(["link", "set", name, "master", BRIDGE], f"cannot attach tap {name} to {BRIDGE}")
                self._ip(["link", "set", name, "up"], f"cannot bring up tap {name}")
            except BaseException:
                _run(["ip", "-n", self.namespace, "link", "del", name])
                raise
            return name
        raise TargetError(f"network namespace {self.namespace}: cannot find a free tap name")

    def command_prefix(self) -> list[str]:
        """The words that run a command inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def destroy(self) -> None:
        """Delete the namespace; its taps and bridge go with it. Fine if it is gone already.

        Stop the lab's VMs first: a process still running in the namespace keeps it (unnamed, and
        still cut off) until it exits.
        """
        self.destroy_namespace(self.namespace)

    @staticmethod
    def destroy_namespace(namespace: str) -> None:
        """`destroy` by name, for a lab whose LabNetwork is gone (cleanup after a crash)."""
        if not LabNetwork.exists(namespace):
            return
        try:
            _ip(["netns", "del", namespace], f"cannot delete network namespace {namespace}")
        except TargetError:
            if LabNetwork.exists(namespace):
                raise

    @staticmethod
    def exists(namespace: str) -> bool:
        """Whether a network namespace of that name exists."""
        return namespace in _all_namespaces()

    def _ip(self, args: list[str], what: str) -> str:
        return _ip(["-n", self.namespace, *args], f"network namespace {self.namespace}: {what}")

    def _links(self) -> list[str]:
        out = self._ip(["-j", "link", "show"], "cannot list interfaces")
        return [link["ifname"] for link in json.loads(out or "[]")]


def _check_namespace(namespace: str) -> None:
    if not namespace.startswith(NAMESPACE_PREFIX):
        raise InvalidArgument(f"lab namespace {namespace!r} must start with {NAMESPACE_PREFIX!r}")
    namespace_for(namespace[len(NAMESPACE_PREFIX) :])


def _interface(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in address:
        raise InvalidArgument(f"lab address {address!r} needs a prefix length, e.g. 10.0.2.2/24")
    try:
        return ipaddress.ip_interface(address)
    except ValueError as e:
        raise InvalidArgument(f"invalid lab address {address!r}: {e}") from None


def _all_namespaces() -> list[str]:
    out = _ip(["-j", "netns", "list"], "cannot list network namespaces")
    return [entry["name"] for entry in json.loads(out or "[]")]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise TargetError("the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise TargetError(f"`{' '.join(argv)}` did not finish in {IP_TIMEOUT:.0f} s") from None


def _ip(args: list[str], what: str) -> str:
    proc = _run(["ip", *args])
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"ip exited with status {proc.returncode}"
        hint = " (needs root)" if "not permitted" in reason or "Permission denied" in reason else ""
        raise TargetError(f"{what}: {reason}{hint}")
    return proc.stdout


# ---- the saved command line, attached to the lab ------------------------------------------------


@dataclass
class NicPlan:
    """One guest NIC of a lab VM: the tap behind it and the MAC the guest sees."""

    netdev_id: str | None  # id of the -netdev (None for -nic)
    tap: str
    mac: str  # the MAC the guest will see (lower case)
    original_mac: str | None  # MAC in the saved command line (None if QEMU's default would have been used)
    mac_changed: bool  # True when the lab had to give a new MAC (conflict with another lab VM, or none set)


def attach_to_lab(argv: list[str], new_tap: Callable[[], str], used_macs: set[str]) -> tuple[list[str], list[NicPlan]]:
    """The saved QEMU command line with every network backend replaced by a tap of the lab.

    Every `-netdev` (any type, key=value or JSON form) becomes a tap backend from `new_tap()` with the
    same id; its old options (hostfwd, helper, vhost, fds, ...) are gone. Each `-device ...,netdev=ID`
    keeps all its options except mac=. Each `-nic TYPE` (not `none`) becomes `-nic tap` keeping
    model=, mac= and id=. Without any network option and without -nodefaults QEMU would add its default
    NIC; the lab adds it as `-nic tap` instead. Every NIC gets an explicit MAC: the saved one unless
    `used_macs` holds it, else a new 52:54:00:xx:xx:xx; each final MAC is added to `used_macs`.
    Plans are per guest NIC, in command-line order (a -netdev without a NIC still gets a tap, no plan).
    """
    options = _network_options(argv)
    taken = {m.lower() for m in used_macs}
    # MACs written in this command line: a generated MAC must not take one that a later NIC keeps
    saved_here: set[str] = set()
    frontends: dict[str, str | None] = {}  # netdev id -> MAC saved on its -device (QEMU allows one NIC per netdev)
    for _, flag, value in options:
        if flag == "-net" and value.strip() != "none":
            raise InvalidArgument(
                f"the saved command line uses the legacy -net option ({value}); the lab cannot attach it "
                "to its network: describe the NIC with -netdev/-device or -nic"
            )
        if flag in ("-device", "-nic"):
            opts = _json_or_keyval(value, flag)
            if opts.get("mac"):
                saved_here.add(opts["mac"].lower())
            if flag == "-device" and opts.get("netdev"):
                frontends.setdefault(opts["netdev"], opts.get("mac"))

    plans: list[NicPlan] = []

    def plan(netdev_id: str | None, saved: str | None) -> NicPlan:
        mac, changed = _choose_mac(saved, taken, saved_here)
        used_macs.add(mac)
        nic = NicPlan(netdev_id, new_tap(), mac, saved, changed)
        plans.append(nic)
        return nic

    # backends first, in command-line order (tap numbers follow it); then the NICs that use them,
    # which QEMU allows anywhere on the line, also before their -netdev
    replaced: dict[int, str] = {}
    for i, flag, value in options:
        if flag == "-netdev":
            replaced[i + 1] = _netdev(value, frontends, plan, new_tap)
        elif flag == "-nic":
            replaced[i + 1] = _nic(value, plan)
    macs = {nic.netdev_id: nic.mac for nic in plans if nic.netdev_id is not None}
    for i, flag, value in options:
        if flag == "-device":
            replaced[i + 1] = _device(value, macs)
    out = [replaced.get(i, arg) for i, arg in enumerate(argv)]
    if not _has_any(options, ("-net", "-netdev", "-nic")) and "-nodefaults" not in map(_flag, argv):
        out += ["-nic", _nic("user", plan)]
    return out, plans


def _has_any(options: list[tuple[int, str, str]], flags: tuple[str, ...]) -> bool:
    return any(flag in flags for _, flag, _ in options)


def _netdev(
    value: str,
    frontends: dict[str, str | None],
    plan: Callable[[str | None, str | None], NicPlan],
    new_tap: Callable[[], str],
) -> str:
    opts = _json_or_keyval(value, "-netdev")
    netdev_id = opts.get("id")
    if not netdev_id:
        raise InvalidArgument(f"the saved command line has a -netdev without id ({value}); the lab cannot attach it")
    # a -netdev no NIC uses (QEMU only warns) still gets a tap: no old backend may survive
    tap = plan(netdev_id, frontends[netdev_id]).tap if netdev_id in frontends else new_tap()
    if _is_json(value):
        return json.dumps({"type": "tap", "id": netdev_id, "ifname": tap, "script": "no", "downscript": "no"})
    return f"tap,id={_escape(netdev_id)},ifname={_escape(tap)},script=no,downscript=no"


def _device(value: str, macs: dict[str, str]) -> str:
    mac = macs.get(_json_or_keyval(value, "-device").get("netdev") or "")
    if mac is None:
        return value  # not a NIC, or its -netdev is not on the command line (QEMU will say so)
    if _is_json(value):
        return json.dumps({**json.loads(value), "mac": mac})
    return ",".join([*(p for p in _split(value) if _key(p) != "mac"), f"mac={mac}"])


def _nic(value: str, plan: Callable[[str | None, str | None], NicPlan]) -> str:
    parts = _split(value)
    opts = _keyval(parts, "type")
    if opts.get("type") == "none":
        return value
    kept = [p for p in parts if _key(p) in ("model", "id")]
    nic = plan(None, opts.get("mac"))
    return ",".join(["tap", f"ifname={_escape(nic.tap)}", "script=no", "downscript=no", *kept, f"mac={nic.mac}"])


def _choose_mac(saved: str | None, taken: set[str], avoid: set[str]) -> tuple[str, bool]:
    if saved and saved.lower() not in taken:
        mac, changed = saved.lower(), False
    else:
        mac = saved.lower() if saved else ""
        while not mac or mac in taken or mac in avoid:
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        changed = True
    taken.add(mac)
    return mac, changed


def _flag(arg: str) -> str:
    return arg[1:] if arg.startswith("--") else arg  # QEMU takes --netdev as -netdev


def _network_options(argv: list[str]) -> list[tuple[int, str, str]]:
    """(index, flag, value) of each -net/-netdev/-nic/-device; other words are not paired (many take no value)."""
    found, i = [], 0
    while i < len(argv) - 1:
        flag = _flag(argv[i])
        if flag in ("-net", "-netdev", "-nic", "-device"):
            found.append((i, flag, argv[i + 1]))
            i += 2
        else:
            i += 1
    return found


def _is_json(value: str) -> bool:
    return value.lstrip().startswith("{")


def _json_or_keyval(value: str, flag: str) -> dict[str, str]:
    """Options of a -netdev/-device/-nic value, unescaped; the type or driver under "type"/"driver"."""
    if _is_json(value):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"the saved command line has an invalid JSON {flag} ({value}): {e}") from None
        if not isinstance(obj, dict):
            raise InvalidArgument(f"the saved command line has an invalid JSON {flag} ({value})")
        return {k: v for k, v in obj.items() if isinstance(v, str)}
    return _keyval(_split(value), "driver" if flag == "-device" else "type")


def _split(value: str) -> list[str]:
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


def _keyval(parts: list[str], implied: str) -> dict[str, str]:
    """The options as a dict (last one wins, as in QEMU); a leading bare word is the implied key."""
    opts = {}
    for n, part in enumerate(parts):
        key = _key(part)
        if key is None:
            if n == 0:
                opts[implied] = part.replace(",,", ",")
            continue  # a bare flag such as `mq`: not needed here
        opts[key] = part.split("=", 1)[1].replace(",,", ",")
    return opts


def _escape(value: str) -> str:
    return value.replace(",", ",,")
