"""The TOML files users write (jobs, lab files, VM inventories): reading them, and the schema
checks they share, each failing with a one-line ConfigError that names the file and the table."""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Iterable

from surepoint.errors import ConfigError


def read_toml(path: str, what: str) -> dict:
    """The parsed file; ConfigError naming `what` ("job file", "lab file"...) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"{what} {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def check_known(table: dict, known: Iterable[str], where: str, *, what: str = "") -> None:
    """ConfigError when `table` has keys outside `known` (a typo must not be silently ignored)."""
    known = list(known)
    unknown = sorted(set(table) - set(known))
    if unknown:
        known_list = ", ".join(known if what else sorted(known))
        if what:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} for {what} (known: {known_list})")
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {known_list}")


def positive_seconds(value: object, what: str) -> float:
    """`value` as seconds; ValueError naming `what` unless it is a positive number (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def one_of(value: object, choices: Collection[str], what: str) -> str:
    """`value` when it is one of `choices`; ValueError naming `what` otherwise."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return value  # type: ignore[return-value]
