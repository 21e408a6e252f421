"""What a lab test ("check") is, as the lab file gives it: its type, options and time limit, validated.

How checks run is in surepoint.lab.checks.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from surepoint.errors import ConfigError
from surepoint.tomlfile import check_known, positive_seconds

CHECK_TYPES = ("heartbeat", "ping", "port", "postgresql", "mariadb", "sqlite", "script")
DEFAULT_TIMEOUTS = {
    "heartbeat": 60.0,
    "ping": 60.0,
    "port": 120.0,
    "postgresql": 300.0,
    "mariadb": 300.0,
    "sqlite": 120.0,
    "script": 300.0,
}


# -- specification -------------------------------------------------------------------------------


@dataclass
class CheckSpec:
    """One test of a lab VM, as written in the lab file (validated, defaults filled in)."""

    type: str
    name: str
    timeout: float
    options: dict = field(default_factory=dict)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {value!r}")
    return value


def _nonempty_string(value: object, what: str) -> str:
    if not _string(value, what):
        raise ValueError(f"{what} must not be empty")
    return value  # type: ignore[return-value]


def _boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {value!r}")
    return value


def _integer(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer from {low} to {high}, not {value!r}")
    return value


def _address(value: object, what: str) -> str:
    try:
        return str(ipaddress.ip_address(_string(value, what)))
    except ValueError:
        raise ValueError(f"{what} must be an IP address (the lab network has no DNS), not {value!r}") from None


def _strings(value: object, what: str, nonempty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be an array of non-empty strings, not {value!r}")
    if nonempty and not value:
        raise ValueError(f"{what} must not be empty")
    return list(value)


def _absolute_path(value: object, what: str) -> str:
    if not _string(value, what).startswith("/"):
        raise ValueError(f"{what} must be an absolute path in the guest, not {value!r}")
    return value  # type: ignore[return-value]


def _where(value: object, what: str) -> str:
    if value not in ("guest", "lab"):
        raise ValueError(f'{what} must be "guest" (run in the VM) or "lab" (run on the lab network), not {value!r}')
    return value  # type: ignore[return-value]


Validator = Callable[[object, str], Any]


@dataclass(frozen=True)
class _Option:
    check: Validator
    required: bool = False
    default: Any = None  # filled in when absent (None: stays absent)


_ADDRESS = _Option(_address)
OPTIONS: dict[str, dict[str, _Option]] = {
    "heartbeat": {},
    "ping": {"address": _ADDRESS, "count": _Option(lambda v, w: _integer(v, w, 1, 100), default=1)},
    "port": {"port": _Option(lambda v, w: _integer(v, w, 1, 65535), required=True), "address": _ADDRESS},
    "postgresql": {
        "database": _Option(_nonempty_string, default="postgres"),
        "query": _Option(_nonempty_string, default="SELECT 1"),
        "expect": _Option(_string),
        "amcheck": _Option(_boolean, default=True),
        "user": _Option(_nonempty_string, default="postgres"),
    },
    "mariadb": {
        "database": _Option(_nonempty_string, required=True),
        "query": _Option(_nonempty_string),
        "expect": _Option(_string),
        "tables": _Option(lambda v, w: _strings(v, w, nonempty=True)),
    },
    "sqlite": {
        "path": _Option(_absolute_path, required=True),
        "query": _Option(_nonempty_string),
        "expect": _Option(_string),
    },
    "script": {
        "argv": _Option(lambda v, w: _strings(v, w, nonempty=True), required=True),
        "where": _Option(_where, default="guest"),
        "expect_exit": _Option(lambda v, w: _integer(v, w, 0, 255), default=0),
    },
}
COMMON_KEYS = ("type", "name", "timeout")


def _default_name(kind: str, options: Mapping[str, Any]) -> str:
    if kind == "ping":
        return f"ping {options['address']}" if options.get("address") else "ping"
    if kind == "port":
        return f"port {options['port']}"
    if kind in ("postgresql", "mariadb"):
        return f"{kind} {options['database']}"
    if kind == "sqlite":
        return f"sqlite {options['path']}"
    if kind == "script":
        return f"{'lab ' if options['where'] == 'lab' else ''}script {os.path.basename(options['argv'][0])}"
    return kind


def parse_check(raw: dict, where: str) -> CheckSpec:
    """A check table of the lab file, validated; ConfigError naming `where` for anything wrong in it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a test must be a table with a `type`, not {raw!r}")
    kind = raw.get("type")
    if kind is None:
        raise ConfigError(f"{where}: `type` is missing (one of: {', '.join(CHECK_TYPES)})")
    if kind not in CHECK_TYPES:
        raise ConfigError(f"{where}: unknown test type {kind!r} (known: {', '.join(CHECK_TYPES)})")
    allowed = OPTIONS[kind]
    check_known(raw, [*COMMON_KEYS, *allowed], where, what=f"a {kind} test")
    options: dict[str, Any] = {}
    try:
        for key, option in allowed.items():
            if key in raw:
                options[key] = option.check(raw[key], f"`{key}`")
            elif option.required:
                raise ValueError(f"`{key}` is required for a {kind} test")
            elif option.default is not None:
                options[key] = option.default
        timeout = positive_seconds(raw.get("timeout", DEFAULT_TIMEOUTS[kind]), "`timeout`")
        name = _nonempty_string(raw["name"], "`name`") if "name" in raw else _default_name(kind, options)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return CheckSpec(type=kind, name=name, timeout=float(timeout), options=options)
