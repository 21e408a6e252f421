"""Re-IP: give a failed-over guest addresses of the recovery site, through its guest agent.

A rule maps a source subnet to a target subnet (the host part of an address is kept, so
192.168.1.23/24 -> 10.10.1.23/24 under 192.168.1.0/24 -> 10.10.1.0/24) and may set the
gateway and DNS servers of the interfaces it moved; without them, a gateway or DNS server inside
the source subnet is mapped like an address. Two guest configurations are understood:
Debian's ifupdown (/etc/network/interfaces and interfaces.d/: `address`, `netmask`, `gateway`,
`dns-nameservers` of an `iface` stanza) and systemd-networkd (/etc/systemd/network/*.network:
`Address=`, `Gateway=`, `DNS=`). /etc/resolv.conf's nameservers follow when it is a plain file.

The rewriting is pure (text in, text and a list of changes out); `apply_reip` reads and writes
the files with the guest agent and restarts the guest's network service. Nothing read from the
guest is printed raw: the changes hold guest text and are passed through surepoint.text.printable.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from surepoint.errors import InvalidArgument
from surepoint.text import printable
from surepoint.vm.errors import GuestAgentCommandError, GuestAgentError
from surepoint.vm.guest_agent import GuestAgent

IFUPDOWN_FILES = ["/etc/network/interfaces"]
IFUPDOWN_DIR = "/etc/network/interfaces.d"
NETWORKD_DIR = "/etc/systemd/network"
RESOLV_CONF = "/etc/resolv.conf"

IPv4Net = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ReipRule:
    """source subnet -> target subnet (same prefix length), with optional gateway and DNS servers."""

    source: IPv4Net
    target: IPv4Net
    gateway: IPAddr | None = None
    dns: tuple[IPAddr, ...] = ()

    @classmethod
    def make(
        cls, source: str, target: str, gateway: str | None = None, dns: list[str] | tuple[str, ...] = ()
    ) -> ReipRule:
        """From strings; InvalidArgument when they are not subnets/addresses or do not fit together."""
        try:
            src = ipaddress.ip_network(source, strict=False)
            dst = ipaddress.ip_network(target, strict=False)
            gw = ipaddress.ip_address(gateway) if gateway else None
            servers = tuple(ipaddress.ip_address(d) for d in dns)
        except ValueError as exc:
            raise InvalidArgument(f"re-IP rule {source} -> {target}: {exc}") from None
        if src.version != dst.version or src.prefixlen != dst.prefixlen:
            raise InvalidArgument(
                f"re-IP rule {source} -> {target}: both subnets need the same IP version and prefix length"
            )
        if gw is not None and gw not in dst:
            raise InvalidArgument(f"re-IP rule {source} -> {target}: gateway {gw} is not in {dst}")
        return cls(src, dst, gw, servers)

    def map(self, address: IPAddr) -> IPAddr | None:
        """The address in the target subnet with the same host part, or None if not in the source subnet."""
        if address.version != self.source.version or address not in self.source:
            return None
        offset = int(address) - int(self.source.network_address)
        return ipaddress.ip_address(int(self.target.network_address) + offset)


@dataclass
class Rewrite:
    """A file after re-IP: its new text and what changed (one line each, guest text escaped)."""

    path: str
    text: str
    changes: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def map_address(address: str, rules: list[ReipRule]) -> tuple[str, ReipRule] | None:
    """`address` (with or without /prefix) moved by the first rule whose source holds it, same notation."""
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError:
        return None
    for rule in rules:
        new = rule.map(iface.ip)
        if new is not None:
            return (f"{new}/{iface.network.prefixlen}" if "/" in address else str(new)), rule
    return None


def _map_plain(address: str, rules: list[ReipRule]) -> str | None:
    found = map_address(address, rules)
    return found[0] if found else None


# -- ifupdown ----------------------------------------------------------------------------------


def rewrite_interfaces(text: str, rules: list[ReipRule], path: str = "/etc/network/interfaces") -> Rewrite:
    """Re-IP an ifupdown file: each `iface` stanza whose address a rule moves gets the new address,
    netmask, gateway and DNS servers; other stanzas stay byte for byte."""
    lines = text.splitlines(keepends=True)
    result = Rewrite(path, text)
    stanzas: list[tuple[int, int]] = []
    start = None
    for n, line in enumerate(lines):
        if re.match(r"\s*(iface|auto|allow-\S+|mapping|source|source-directory)\b", line):
            if start is not None:
                stanzas.append((start, n))
                start = None
            if re.match(r"\s*iface\b", line):
                start = n
    if start is not None:
        stanzas.append((start, len(lines)))
    for first, end in stanzas:
        iface = lines[first].split()[1] if len(lines[first].split()) > 1 else "?"
        rule = None
        for n in range(first + 1, end):
            key, value, indent = _option(lines[n])
            if key == "address":
                found = map_address(value, rules)
                if found:
                    new, rule = found
                    lines[n] = f"{indent}address {new}\n"
                    result.changes.append(f"{path}: {printable(iface)} address {printable(value)} -> {new}")
        if rule is None:
            continue
        result.interfaces.append(iface)
        for n in range(first + 1, end):
            key, value, indent = _option(lines[n])
            if key == "gateway":
                new = str(rule.gateway) if rule.gateway else _map_plain(value, rules)
                if new and new != value:
                    lines[n] = f"{indent}gateway {new}\n"
                    result.changes.append(f"{path}: {printable(iface)} gateway {printable(value)} -> {new}")
            elif key == "dns-nameservers":
                old = value.split()
                servers = [str(d) for d in rule.dns] if rule.dns else [_map_plain(s, rules) or s for s in old]
                if servers != old:
                    lines[n] = f"{indent}dns-nameservers {' '.join(servers)}\n"
                    result.changes.append(
                        f"{path}: {printable(iface)} dns-nameservers {printable(value)} -> {' '.join(servers)}"
                    )
    result.text = "".join(lines)
    return result


def _option(line: str) -> tuple[str, str, str]:
    match = re.match(r"(\s*)(\S+)\s*(.*?)\s*$", line)
    if not match or line.lstrip().startswith("#"):
        return "", "", ""
    return match.group(2), match.group(3), match.group(1) or "    "


# -- systemd-networkd --------------------------------------------------------------------------


def rewrite_networkd(text: str, rules: list[ReipRule], path: str = "/etc/systemd/network/x.network") -> Rewrite:
    """Re-IP a systemd-networkd .network file: Address= lines a rule moves, then Gateway= and DNS= of
    the file (the rule's, or mapped like addresses); a file with no moved address stays as it is."""
    lines = text.splitlines(keepends=True)
    result = Rewrite(path, text)
    rule = None
    for n, line in enumerate(lines):
        key, values = _networkd_option(line)
        if key == "Address":
            new_values = []
            for value in values:
                found = map_address(value, rules)
                if found:
                    new_values.append(found[0])
                    rule = found[1]
                    result.changes.append(f"{path}: Address {printable(value)} -> {found[0]}")
                else:
                    new_values.append(value)
            if new_values != values:
                lines[n] = f"Address={' '.join(new_values)}\n"
    if rule is None:
        return result
    match_name = next((v for line in lines for k, v in [_networkd_option(line)] if k == "Name"), [])
    result.interfaces.extend(match_name)
    dns_written = False
    for n, line in enumerate(lines):
        key, values = _networkd_option(line)
        if key == "Gateway":
            new = [str(rule.gateway) if rule.gateway else (_map_plain(v, rules) or v) for v in values]
            if new != values:
                lines[n] = f"Gateway={' '.join(new)}\n"
                result.changes.append(f"{path}: Gateway {printable(' '.join(values))} -> {' '.join(new)}")
        elif key == "DNS":
            if rule.dns:
                new = [str(d) for d in rule.dns] if not dns_written else []
                dns_written = True
            else:
                new = [_map_plain(v, rules) or v for v in values]
            if new != values:
                lines[n] = f"DNS={' '.join(new)}\n" if new else ""
                result.changes.append(f"{path}: DNS {printable(' '.join(values))} -> {' '.join(new) or '(removed)'}")
    result.text = "".join(lines)
    return result


def _networkd_option(line: str) -> tuple[str, list[str]]:
    stripped = line.strip()
    if not stripped or stripped[0] in "#;[" or "=" not in stripped:
        return "", []
    key, value = stripped.split("=", 1)
    return key.strip(), value.split()


# -- resolv.conf -------------------------------------------------------------------------------


def rewrite_resolv_conf(text: str, rules: list[ReipRule], path: str = RESOLV_CONF) -> Rewrite:
    """nameserver lines moved by the rules (a rule's DNS servers replace those in its source subnet)."""
    result = Rewrite(path, text)
    out = []
    replaced: set[ReipRule] = set()
    for line in text.splitlines(keepends=True):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            found = map_address(parts[1], rules)
            if found:
                new, rule = found
                if rule.dns:
                    if rule not in replaced:
                        replaced.add(rule)
                        out.extend(f"nameserver {d}\n" for d in rule.dns)
                    result.changes.append(
                        f"{path}: nameserver {printable(parts[1])} -> {' '.join(str(d) for d in rule.dns)}"
                    )
                    continue
                out.append(f"nameserver {new}\n")
                result.changes.append(f"{path}: nameserver {printable(parts[1])} -> {new}")
                continue
        out.append(line)
    result.text = "".join(out)
    return result


# -- in the guest ------------------------------------------------------------------------------


def apply_reip(agent: GuestAgent, rules: list[ReipRule], *, restart: bool = True) -> list[str]:
    """Rewrite the guest's network configuration through its agent and restart its network service.

    Returns the changes (printable lines). Files that do not exist are skipped; a guest with neither
    configuration gets no change.
    """
    changes: list[str] = []
    ifupdown = [*IFUPDOWN_FILES, *_list_dir(agent, IFUPDOWN_DIR)]
    networkd = [p for p in _list_dir(agent, NETWORKD_DIR) if p.endswith(".network")]
    changed_kinds: set[str] = set()
    for path in ifupdown + networkd:
        text = _read(agent, path)
        if text is None:
            continue
        kind = "networkd" if path in networkd else "ifupdown"
        result = (rewrite_networkd if kind == "networkd" else rewrite_interfaces)(text, rules, path)
        if result.changed:
            agent.write_file(path, result.text.encode())
            changes += result.changes
            changed_kinds.add(kind)
    if changed_kinds:
        resolv = _read(agent, RESOLV_CONF)
        if resolv is not None and not _is_symlink(agent, RESOLV_CONF):
            result = rewrite_resolv_conf(resolv, rules)
            if result.changed:
                agent.write_file(RESOLV_CONF, result.text.encode())
                changes += result.changes
    if restart:
        for kind in sorted(changed_kinds):
            unit = "systemd-networkd" if kind == "networkd" else "networking"
            done = agent.exec(["systemctl", "try-restart", unit], timeout=120)
            if not done.ok:
                changes.append(f"restarting {unit} failed: {printable(done.stderr.decode(errors='replace').strip())}")
            else:
                changes.append(f"restarted {unit}")
    return changes


def _read(agent: GuestAgent, path: str) -> str | None:
    try:
        return agent.read_file(path).decode("utf-8", "surrogateescape")
    except GuestAgentCommandError:
        return None  # no such file


def _list_dir(agent: GuestAgent, path: str) -> list[str]:
    try:
        done = agent.exec(["find", path, "-maxdepth", "1", "-type", "f"], timeout=30)
    except GuestAgentError:
        return []
    if not done.ok:
        return []
    return sorted(line for line in done.stdout.decode(errors="replace").splitlines() if line.startswith(path + "/"))


def _is_symlink(agent: GuestAgent, path: str) -> bool:
    try:
        return agent.exec(["test", "-L", path], timeout=30).ok
    except GuestAgentError:
        return False
