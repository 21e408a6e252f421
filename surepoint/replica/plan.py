"""Failover plans: several replicas failed over in order, each checked up before the next.

```toml
[plan]
target = "/srv/replicas"      # where the NAME-replica directories are (each VM may override it)
delay = 10                    # seconds to wait after a VM is up before the next one starts
boot_timeout = 300            # seconds until a VM's guest agent must answer

[[reip]]                      # re-IP rules for every VM of the plan (a VM's own come first)
source = "192.168.1.0/24"
target = "10.10.1.0/24"
gateway = "10.10.1.1"
dns = ["10.10.1.53"]

[[vm]]
name = "db01"
point = "latest"              # a point id, `latest` or a time (the latest point at or before it)
network = ["net0=bridge:br-dr"]   # NETDEV=none|user|bridge:NAME|tap:NAME, or just TO for every NIC
[vm.check]                    # up = the guest agent answers, and:
port = 5432                   # a TCP port opens (at `address`, default the guest's first IPv4 address)
command = ["systemctl", "is-active", "postgresql"]   # exits 0 in the guest
timeout = 120
```

Parsing is pure; `surepoint.jobs.failover.run_plan` carries a plan out (and undoes it in reverse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from surepoint.errors import ConfigError, InvalidArgument
from surepoint.replica.netmap import NetworkRule
from surepoint.replica.reip import ReipRule
from surepoint.tomlfile import check_known, positive_seconds, read_toml

PLAN_KEYS = ("target", "delay", "boot_timeout")
VM_KEYS = ("name", "target", "point", "delay", "boot_timeout", "network", "reip", "check")
CHECK_KEYS = ("port", "address", "command", "timeout")
REIP_KEYS = ("source", "target", "gateway", "dns")
DEFAULT_BOOT_TIMEOUT = 300.0
DEFAULT_CHECK_TIMEOUT = 120.0


@dataclass
class UpCheck:
    """When a VM counts as up: its guest agent answers, then the port opens and the command succeeds."""

    port: int | None = None
    address: str | None = None
    command: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_CHECK_TIMEOUT


@dataclass
class PlanVm:
    name: str
    target: str
    point: str = "latest"
    delay: float = 0.0
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    network: list[NetworkRule] = field(default_factory=list)
    reip: list[ReipRule] = field(default_factory=list)
    check: UpCheck = field(default_factory=UpCheck)


@dataclass
class FailoverPlan:
    path: str
    vms: list[PlanVm]


def load_plan(path: str) -> FailoverPlan:
    return parse_plan(read_toml(path, "failover plan"), path)


def parse_plan(raw: dict, path: str) -> FailoverPlan:
    """A FailoverPlan from parsed TOML; ConfigError naming the file, the entry and the key."""
    check_known(raw, ("plan", "reip", "vm"), path)
    plan = _table(raw.get("plan", {}), f"{path}: [plan]")
    check_known(plan, PLAN_KEYS, f"{path}: [plan]")
    default_target = plan.get("target")
    default_delay = _seconds(plan.get("delay", 0), f"{path}: [plan] delay", zero=True)
    default_boot = _seconds(plan.get("boot_timeout", DEFAULT_BOOT_TIMEOUT), f"{path}: [plan] boot_timeout")
    common_reip = [_reip(r, f"{path}: [[reip]] #{n + 1}") for n, r in enumerate(_list(raw.get("reip", []), path))]
    entries = _list(raw.get("vm", []), f"{path}: [[vm]]")
    if not entries:
        raise ConfigError(f"{path}: a failover plan needs at least one [[vm]]")
    vms = []
    for n, entry in enumerate(entries):
        where = f"{path}: [[vm]] #{n + 1}"
        entry = _table(entry, where)
        check_known(entry, VM_KEYS, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f'{where}: needs name = "VM name"')
        where = f"{path}: [[vm]] {name}"
        target = entry.get("target", default_target)
        if not isinstance(target, str) or not target:
            raise ConfigError(f'{where}: needs target = "/replica/site" (or [plan] target)')
        point = entry.get("point", "latest")
        if not isinstance(point, str) or not point:
            raise ConfigError(f'{where}: point must be a point id, "latest" or a time')
        network_raw = entry.get("network", [])
        if not isinstance(network_raw, list) or not all(isinstance(x, str) for x in network_raw):
            raise ConfigError(f'{where}: network must be a list like ["net0=bridge:br0"]')
        try:
            network = [NetworkRule.parse(x) for x in network_raw]
        except InvalidArgument as exc:
            raise ConfigError(f"{where}: {exc}") from None
        own_reip = [_reip(r, f"{where} reip #{i + 1}") for i, r in enumerate(_list(entry.get("reip", []), where))]
        vms.append(
            PlanVm(
                name=name,
                target=os.path.expanduser(target),
                point=point,
                delay=_seconds(entry.get("delay", default_delay), f"{where} delay", zero=True),
                boot_timeout=_seconds(entry.get("boot_timeout", default_boot), f"{where} boot_timeout"),
                network=network,
                reip=own_reip + common_reip,
                check=_check(entry.get("check", {}), f"{where} check"),
            )
        )
    names = [v.name for v in vms]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ConfigError(f"{path}: VM(s) listed twice: {', '.join(twice)}")
    return FailoverPlan(path, vms)


def _check(raw: object, where: str) -> UpCheck:
    table = _table(raw, where)
    check_known(table, CHECK_KEYS, where)
    port = table.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(f"{where}: port must be a TCP port number, not {port!r}")
    address = table.get("address")
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"{where}: address must be a string")
    command = table.get("command", [])
    if not isinstance(command, list) or not all(isinstance(x, str) for x in command):
        raise ConfigError(f"{where}: command must be a list of strings (an argument vector, not a shell line)")
    return UpCheck(port, address, command, _seconds(table.get("timeout", DEFAULT_CHECK_TIMEOUT), f"{where} timeout"))


def _reip(raw: object, where: str) -> ReipRule:
    table = _table(raw, where)
    check_known(table, REIP_KEYS, where)
    source, target = table.get("source"), table.get("target")
    if not isinstance(source, str) or not isinstance(target, str):
        raise ConfigError(f'{where}: needs source = "SUBNET" and target = "SUBNET"')
    dns = table.get("dns", [])
    if isinstance(dns, str):
        dns = [dns]
    gateway = table.get("gateway")
    if not isinstance(dns, list) or not all(isinstance(x, str) for x in dns) or not isinstance(gateway, str | None):
        raise ConfigError(f"{where}: gateway is an address, dns a list of addresses")
    try:
        return ReipRule.make(source, target, gateway, dns)
    except InvalidArgument as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _seconds(value: object, what: str, *, zero: bool = False) -> float:
    if zero and value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return positive_seconds(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    return value


def _list(value: object, where: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be an array of tables")
    return value
