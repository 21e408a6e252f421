"""Reading the TOML files users write (jobs, lab files, VM inventories) with one-line errors."""

from __future__ import annotations

import tomllib

from surepoint.errors import UsageError


def read_toml(path: str, what: str) -> dict:
    """The parsed file; UsageError naming `what` ("job file", "lab file"...) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise UsageError(f"{what} {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None
