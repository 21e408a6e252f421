"""Lab files (TOML): the lab's network, its application group and the tests of the verified VMs.

    [lab]
    timeout = 1800                  # seconds for the whole run; then everything is torn down
    network = "isolated"            # "isolated": a namespace with a bridge; "none": no network at all
    addresses = ["10.0.2.2/24"]     # the bridge's own addresses: where ping and port tests come from

    [[group]]                       # the application group: started first, in this order
    name = "db"
    restore_point = "db01:latest"   # id, id prefix or NAME:latest
    boot_timeout = 300
    [[group.test]]
    type = "postgresql"
    database = "shop"

    [[verify]]                      # tests of the restore points under verification
    vm = "*"                        # a VM name, or "*" for any
    [[verify.test]]
    type = "port"
    port = 443

Every group VM must pass its tests before the next one starts; the verified VMs start after the
whole group is healthy. A verified VM without a matching [[verify]] entry gets the heartbeat test.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from surepoint.errors import ConfigError
from surepoint.lab.check_spec import CheckSpec, parse_check
from surepoint.tomlfile import check_known, positive_seconds, read_toml

NETWORK_MODES = ("isolated", "none")
DEFAULT_TIMEOUT = 3600.0
DEFAULT_BOOT_TIMEOUT = 300.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass
class LabVmSpec:
    """One VM of the lab: a group member (with its restore point) or the tests for verified VMs."""

    name: str
    role: str  # "group" | "verified"
    restore_point: str | None = None  # group members
    vm: str = "*"  # [[verify]] entries: the VM name they apply to
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    tests: list[CheckSpec] = field(default_factory=list)


@dataclass
class LabConfig:
    path: str
    timeout: float = DEFAULT_TIMEOUT
    network: str = "isolated"
    addresses: list[str] = field(default_factory=list)
    group: list[LabVmSpec] = field(default_factory=list)
    verify: list[LabVmSpec] = field(default_factory=list)

    def spec_for(self, vm_name: str) -> LabVmSpec:
        """The tests for a verified VM: its own [[verify]] entry, else the "*" one, else heartbeat only."""
        for wanted in (vm_name, "*"):
            for spec in self.verify:
                if spec.vm == wanted:
                    return spec
        return LabVmSpec(name=vm_name, role="verified", vm=vm_name, tests=[parse_check({"type": "heartbeat"}, vm_name)])


def load_lab_config(path: str) -> LabConfig:
    return parse_lab_config(read_toml(path, "lab file"), path)


def _positive(value: object, what: str) -> float:
    try:
        return positive_seconds(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _unknown(table: dict, known: set[str], where: str) -> None:
    check_known(table, known, where)


def _tests(raw: object, where: str) -> list[CheckSpec]:
    if raw is None:
        return [parse_check({"type": "heartbeat"}, where)]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f'{where}: `test` must be an array of tables: [[group.test]] type = "port" ...')
    tests = [parse_check(t, f"{where} test {i + 1}") for i, t in enumerate(raw)]
    if not any(t.type == "heartbeat" for t in tests):
        tests.insert(0, parse_check({"type": "heartbeat"}, where))  # the agent answering is the first sign of life
    return tests


def parse_lab_config(raw: dict, path: str = "<lab>") -> LabConfig:
    _unknown(raw, {"lab", "group", "verify"}, path)
    lab = raw.get("lab", {})
    if not isinstance(lab, dict):
        raise ConfigError(f"{path}: [lab] must be a table")
    _unknown(lab, {"timeout", "network", "addresses"}, f"{path} [lab]")
    config = LabConfig(path=path)
    config.timeout = _positive(lab.get("timeout", DEFAULT_TIMEOUT), f"{path} [lab] timeout")
    config.network = lab.get("network", "isolated")
    if config.network not in NETWORK_MODES:
        raise ConfigError(f"{path} [lab] network must be one of {', '.join(NETWORK_MODES)}, not {config.network!r}")
    addresses = lab.get("addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise ConfigError(f'{path} [lab] addresses must be a list like ["10.0.2.2/24"]')
    for address in addresses:
        try:
            ipaddress.ip_interface(address)
        except ValueError:
            raise ConfigError(
                f"{path} [lab] addresses: {address!r} is not an address with prefix, e.g. 10.0.2.2/24"
            ) from None
        if "/" not in address:
            raise ConfigError(f"{path} [lab] addresses: {address!r} needs a prefix length, e.g. {address}/24")
    if addresses and config.network == "none":
        raise ConfigError(f'{path} [lab] addresses make no sense with network = "none"')
    config.addresses = list(addresses)

    group = raw.get("group", [])
    if not isinstance(group, list) or not all(isinstance(g, dict) for g in group):
        raise ConfigError(f'{path}: `group` must be an array of tables: [[group]] name = "db" ...')
    seen: set[str] = set()
    for i, entry in enumerate(group):
        where = f"{path} group {i + 1}"
        _unknown(entry, {"name", "restore_point", "boot_timeout", "test"}, where)
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(f"{where}: `name` must be a short name of letters, digits, '.', '_' or '-', not {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        seen.add(name)
        where = f"{path} group {name!r}"
        point = entry.get("restore_point")
        if not isinstance(point, str) or not point:
            raise ConfigError(
                f'{where}: `restore_point` is required (an id, id prefix or NAME:latest, e.g. "db:latest")'
            )
        config.group.append(
            LabVmSpec(
                name=name,
                role="group",
                restore_point=point,
                boot_timeout=_positive(entry.get("boot_timeout", DEFAULT_BOOT_TIMEOUT), f"{where} boot_timeout"),
                tests=_tests(entry.get("test"), where),
            )
        )

    verify = raw.get("verify", [])
    if not isinstance(verify, list) or not all(isinstance(v, dict) for v in verify):
        raise ConfigError(f'{path}: `verify` must be an array of tables: [[verify]] vm = "*" ...')
    vms: set[str] = set()
    for i, entry in enumerate(verify):
        where = f"{path} verify {i + 1}"
        _unknown(entry, {"vm", "boot_timeout", "test"}, where)
        vm = entry.get("vm", "*")
        if not isinstance(vm, str) or not vm:
            raise ConfigError(f'{where}: `vm` must be a VM name or "*"')
        if vm in vms:
            raise ConfigError(f"{where}: there is already a [[verify]] entry for vm {vm!r}")
        vms.add(vm)
        config.verify.append(
            LabVmSpec(
                name=vm,
                role="verified",
                vm=vm,
                boot_timeout=_positive(entry.get("boot_timeout", DEFAULT_BOOT_TIMEOUT), f"{where} boot_timeout"),
                tests=_tests(entry.get("test"), f"{path} verify {vm!r}"),
            )
        )
    if config.network == "none":
        for spec in config.group + config.verify:
            for test in spec.tests:
                if test.type in ("ping", "port") or (test.type == "script" and test.options.get("where") == "lab"):
                    raise ConfigError(
                        f'{path}: {spec.name} test {test.name!r} needs the lab network (network = "none")'
                    )
    return config
