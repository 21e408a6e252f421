"""Network mapping of a failover: which network each of the replica VM's NICs is attached to.

A rule names a backend of the saved command line by its `-netdev` id (or `*` for all) and where it
goes: `bridge:NAME` (QEMU's bridge helper puts a tap on that bridge), `tap:NAME` (an existing tap),
`user` (user-mode networking), or `none` (the NIC stays in the guest, cable unplugged: a hub port
with nothing else on the hub). The guest's NICs keep their device model, PCI address and MAC, so
the guest sees the same interfaces; only what is behind them changes. Backends no rule names are
kept as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from surepoint.errors import InvalidArgument

KINDS = ("none", "user", "bridge", "tap")
HUB_BASE = 900  # hub ids of unplugged NICs: one hub each, far above what a command line would use


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
    """`argv` with each `-netdev` a rule names replaced by the rule's backend (same id).

    InvalidArgument when a rule names a netdev id the command line does not have.
    """
    if not rules:
        return list(argv)
    out = list(argv)
    seen: set[str] = set()
    hub = HUB_BASE
    for i in range(len(argv) - 1):
        if argv[i] not in ("-netdev", "--netdev"):
            continue
        value = argv[i + 1]
        netdev_id = _netdev_id(value)
        rule = next((r for r in rules if r.netdev == netdev_id), None) or next(
            (r for r in rules if r.netdev == "*"), None
        )
        if rule is None:
            continue
        seen.add(netdev_id)
        out[i + 1] = _backend(rule.to, netdev_id, hub, json_form=value.lstrip().startswith("{"))
        hub += rule.to == "none"
    unknown = sorted({r.netdev for r in rules if r.netdev != "*"} - seen)
    if unknown:
        raise InvalidArgument(f"the saved command line has no network backend (-netdev) with id {', '.join(unknown)}")
    return out


def _netdev_id(value: str) -> str:
    if value.lstrip().startswith("{"):
        try:
            return str(json.loads(value).get("id", ""))
        except (json.JSONDecodeError, AttributeError):
            raise InvalidArgument(f"the saved command line has an invalid JSON -netdev ({value})") from None
    for part in value.replace(",,", "\0").split(","):
        if part.startswith("id="):
            return part[3:].replace("\0", ",")
    raise InvalidArgument(f"the saved command line has a -netdev without id ({value})")


def _backend(to: str, netdev_id: str, hub: int, *, json_form: bool) -> str:
    kind, _, arg = to.partition(":")
    fields: dict[str, object] = {"type": kind, "id": netdev_id}
    if kind == "none":
        fields = {"type": "hubport", "id": netdev_id, "hubid": hub}
    elif kind == "bridge":
        fields["br"] = arg
    elif kind == "tap":
        fields.update(ifname=arg, script="no", downscript="no")
    if json_form:
        return json.dumps(fields)
    kind_word = fields.pop("type")
    return ",".join([str(kind_word), *(f"{k}={str(v).replace(',', ',,')}" for k, v in fields.items())])
