"""Network mapping of a failover: which network each of the replica VM's NICs is attached to.

A rule names a backend of the saved command line by its `-netdev` id (or `*` for all) and where it
goes: `bridge:NAME` (QEMU's bridge helper puts a tap on that bridge), `tap:NAME` (an existing tap),
`user` (user-mode networking), or `none` (the NIC stays in the guest with no backend: unplugged).
The guest's NICs keep their device model, PCI address and MAC, so the guest sees the same
interfaces; only what is behind them changes. Backends no rule names are kept as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from surepoint.errors import InvalidArgument
from surepoint.vm.command_line import NetworkMap, rewrite_network, split_options

KINDS = ("none", "user", "bridge", "tap")


@dataclass(frozen=True)
class NetworkRule:
    """Move the backend `netdev` (an id, or `*`) to `to`: none, user, bridge:NAME or tap:NAME."""

    netdev: str
    to: str

    def __post_init__(self) -> None:
        kind, _, arg = self.to.partition(":")
        if kind not in KINDS:
            raise InvalidArgument(f"network {self.to!r}: use none, user, bridge:NAME or tap:NAME")
        if kind in ("bridge", "tap") and not arg:
            raise InvalidArgument(f"network {self.to!r} needs a name ({kind}:NAME)")
        if kind in ("none", "user") and arg:
            raise InvalidArgument(f"network {self.to!r}: {kind} takes no name")
        if not self.netdev or "," in self.netdev:
            raise InvalidArgument(f"network rule for netdev {self.netdev!r}: give a -netdev id or *")

    @classmethod
    def parse(cls, text: str) -> NetworkRule:
        """`NETDEV=TO` or just `TO` (every backend), as given on the command line."""
        netdev, sep, to = text.partition("=")
        return cls(netdev.strip(), to.strip()) if sep else cls("*", text.strip())


def apply_network(argv: list[str], rules: list[NetworkRule]) -> list[str]:
    """`argv` with each `-netdev` a rule names (and the NIC that uses it) put on the rule's network.

    Each backend is rewritten by surepoint.vm.command_line (the one rewriter of saved command lines)
    on its own, with its NIC, so that different backends can go to different networks; MACs are kept.
    InvalidArgument when a rule names a netdev id the command line does not have.
    """
    if not rules:
        return list(argv)
    netdevs: dict[str, int] = {}  # id -> index of the -netdev flag
    nics: dict[str, int] = {}  # netdev id -> index of the -device flag using it
    for i in range(len(argv) - 1):
        flag = argv[i][1:] if argv[i].startswith("--") else argv[i]
        if flag == "-netdev":
            netdevs[_option(argv[i + 1], "id")] = i
        elif flag == "-device" and (netdev := _option(argv[i + 1], "netdev")):
            nics[netdev] = i
    unknown = sorted({r.netdev for r in rules if r.netdev != "*"} - set(netdevs))
    if unknown:
        raise InvalidArgument(f"the saved command line has no network backend (-netdev) with id {', '.join(unknown)}")
    replaced: dict[int, list[str]] = {}
    taps: dict[str, str] = {}  # tap:NAME -> the backend it went to (a tap takes one)
    for netdev_id, i in netdevs.items():
        rule = next((r for r in rules if r.netdev == netdev_id), None) or next(
            (r for r in rules if r.netdev == "*"), None
        )
        if rule is None:
            continue
        if rule.to.startswith("tap:"):
            if rule.to in taps:
                raise InvalidArgument(f"{rule.to} is given to two network backends ({taps[rule.to]}, {netdev_id})")
            taps[rule.to] = netdev_id
        j = nics.get(netdev_id)
        alone = [argv[i], argv[i + 1], *([argv[j], argv[j + 1]] if j is not None else []), "-nodefaults"]
        new = rewrite_network(alone, NetworkMap.parse(rule.to), set(), macs="keep").argv
        pairs = [(new[k], new[k + 1]) for k in range(0, len(new) - 1, 2) if new[k] != "-nodefaults"]
        replaced[i] = [w for flag, value in pairs if flag.lstrip("-") == "netdev" for w in (flag, value)]
        if j is not None:
            replaced[j] = [w for flag, value in pairs if flag.lstrip("-") == "device" for w in (flag, value)]
    out: list[str] = []
    i = 0
    while i < len(argv):
        if i in replaced:
            out += replaced[i]
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _option(value: str, key: str) -> str:
    """One option of a -netdev/-device value (key=value or JSON), '' when absent."""
    if value.lstrip().startswith("{"):
        try:
            found = json.loads(value).get(key, "")
        except (json.JSONDecodeError, AttributeError):
            raise InvalidArgument(f"the saved command line has an invalid JSON option ({value})") from None
        return found if isinstance(found, str) else ""
    for part in split_options(value):
        if part.startswith(f"{key}="):
            return part[len(key) + 1 :].replace(",,", ",")
    return ""
