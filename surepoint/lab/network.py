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
from surepoint.vm.command_line import NetworkMap, Nic, rewrite_network

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

NicPlan = Nic  # one guest NIC of a lab VM: the tap behind it and the MAC the guest sees


def attach_to_lab(argv: list[str], new_tap: Callable[[], str], used_macs: set[str]) -> tuple[list[str], list[NicPlan]]:
    """The saved QEMU command line with every network backend replaced by a tap of the lab.

    surepoint.vm.command_line does the work (network tap, MACs unique among the lab's VMs): every
    `-netdev` becomes a tap from `new_tap()` with the same id and none of its old options; each NIC
    keeps its frontend and gets an explicit MAC, the saved one unless `used_macs` holds it.
    """
    words = list(argv)
    result = rewrite_network(words, NetworkMap("tap", tap=new_tap), used_macs)
    return result.argv, result.nics
