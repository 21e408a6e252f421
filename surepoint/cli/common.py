"""What every command module shares: the consoles, global options, `Context`, the passphrase
reader, JSON and size helpers. Command modules import from here; `app.py` imports them."""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from surepoint import storage
from surepoint.catalog import Catalog, default_catalog_path
from surepoint.errors import DamagedData, SurepointError, UsageError, WrongPassphrase
from surepoint.repo.known import KnownRepositories
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.text import printable
from surepoint.timestamps import format_utc

EXIT_DAMAGE = DamagedData.exit_code


class SafeConsole(Console):
    """A console that escapes control characters in every string it prints (messages, table cells).

    Names from guests and users are escaped where they are formatted (surepoint.text.printable);
    this is the last guard for anything that was not: an escape sequence never reaches the terminal.
    """

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(printable(text, lines=True), **kwargs)


# Wide tables when piped, so ids and dates are never cut short in logs.
# No markup: names, paths and messages come from users and guests and are printed as they are.
out = SafeConsole(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False)
err = SafeConsole(
    stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True, markup=False, highlight=False
)


def say_error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", printable(message, lines=True)))


def say_warning(message: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", printable(message, lines=True)))


def log_line(message: str) -> None:
    """Progress lines of a running job, indented under the command's own output."""
    err.print(f"  {message}")


def quiet(_message: str) -> None:
    """A log callback that drops everything (--json keeps stdout and stderr clean)."""


RepoOption = Annotated[
    str | None,
    typer.Option("--repo", "-r", envvar="SUREPOINT_REPO", help="Repository path.", show_envvar=True),
]
PassFileOption = Annotated[
    str | None,
    typer.Option("--passphrase-file", envvar="SUREPOINT_PASSPHRASE_FILE", help="Read the passphrase from a file."),
]
CatalogOption = Annotated[
    str | None, typer.Option("--catalog", envvar="SUREPOINT_CATALOG", help="Catalog database (SQLite) path.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
InventoryOption = Annotated[str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (TOML).")]
SkipFreeOption = Annotated[
    bool,
    typer.Option(
        "--skip-free/--no-skip-free",
        help="Store blocks that ext4, XFS and swap mark free as zeros, without reading them.",
    ),
]


def read_passphrase(
    *, env_var: str, file: str | None, prompt: str, repeat_prompt: str, confirm: bool, missing: str
) -> str:
    """A passphrase from `env_var`, else from `file` (without its final newline), else typed at a
    terminal (twice when `confirm`); UsageError `missing` when none of these is possible."""
    value = os.environ.get(env_var)
    if value is not None:
        return value
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                return f.read().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file {file}: {exc.strerror}") from None
    if sys.stdin.isatty():
        first = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{repeat_prompt}: ") != first:
            raise UsageError("the passphrases do not match")
        return first
    raise UsageError(missing)


class Context:
    """What every command needs: where the repository is and how to get its passphrase."""

    def __init__(self, repo: str | None, passphrase_file: str | None, catalog: str | None) -> None:
        self.repo_location = repo
        self.passphrase_file = passphrase_file
        self.catalog_path = catalog or default_catalog_path()
        self._catalog: Catalog | None = None
        self._passphrase: str | None = None  # asked once per command, even when needed twice (passwd)

    def location(self) -> str:
        if not self.repo_location:
            raise UsageError("no repository given: pass --repo PATH or set SUREPOINT_REPO")
        return self.repo_location

    def passphrase(self, *, confirm: bool = False) -> str:
        if self._passphrase is None:
            self._passphrase = self._read_passphrase(confirm)
        return self._passphrase

    def _read_passphrase(self, confirm: bool) -> str:
        return read_passphrase(
            env_var="SUREPOINT_PASSPHRASE",
            file=self.passphrase_file,
            prompt="repository passphrase",
            repeat_prompt="repeat passphrase",
            confirm=confirm,
            missing="this repository needs a passphrase: set SUREPOINT_PASSPHRASE or pass --passphrase-file",
        )

    def open_repository(self) -> Repository:
        # the config's MAC, and this machine's memory of the repository (repo/known.py), are checked
        return Repository.open(storage.open(self.location()), self.passphrase, known=KnownRepositories())

    def catalog(self) -> Catalog:
        if self._catalog is None:
            try:
                self._catalog = Catalog(self.catalog_path)
            except Exception as exc:  # noqa: BLE001 - sqlite3 and OS errors alike
                raise SurepointError(f"cannot open catalog {self.catalog_path}: {exc}") from None
        return self._catalog


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def human(n: float) -> str:
    """Bytes for people: 512 B, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '256M', '1G', '4096', '512KiB'."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise UsageError(f"{text!r} is not a size like 256M or 1G")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def short_time(iso: str) -> str:
    """'2026-01-31 12:00:00' from a stored UTC time stamp, for tables."""
    return iso[:19].replace("T", " ")


def point_json(point: RestorePoint, verification: dict[str, str]) -> dict:
    """A restore point as `list --json`, `show --json` and `backup --json` print it."""
    data = asdict(point)
    data.update(verification)  # state, integrity, recovery
    data["size"] = point.size
    return data


UNVERIFIED = {"state": "unverified", "integrity": "unverified", "recovery": "unverified"}


def parse_since(text: str) -> str:
    """The stored time-stamp form of a date the user typed (local time unless it says otherwise)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is not a date like 2026-01-31 or 2026-01-31T12:00") from None
    return format_utc(when)


F = TypeVar("F", bound=Callable)


def with_hints(rules: dict[type[SurepointError], str]) -> Callable[[F], F]:
    """A command decorator: errors of these classes leave with this advice as their `hint`.

    The core names the problem; what to run or which flag to use next is the command line's to say.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except SurepointError as exc:
                if not getattr(exc, "hint", None):
                    exc.hint = next((h for cls, h in rules.items() if isinstance(exc, cls)), None)
                raise

        return run  # type: ignore[return-value]

    return decorate


FROM_PASSPHRASE = "SUREPOINT_FROM_PASSPHRASE"
FROM_PASSPHRASE_FILE = "SUREPOINT_FROM_PASSPHRASE_FILE"


def source_passphrase(location: str) -> str:
    """The source repository's passphrase: SUREPOINT_FROM_PASSPHRASE(_FILE), else a prompt on a terminal."""
    return read_passphrase(
        env_var=FROM_PASSPHRASE,
        file=os.environ.get(FROM_PASSPHRASE_FILE),
        prompt=f"passphrase of the source repository {location}",
        repeat_prompt="",
        confirm=False,
        missing=f"the source repository {location} is encrypted: set {FROM_PASSPHRASE} or {FROM_PASSPHRASE_FILE}",
    )


def open_other_repository(location: str, passphrase, side: str, where: str) -> Repository:
    """A second repository (copy's source or target, repair's copy); a wrong passphrase names which one."""
    backend = storage.open(location)
    try:
        return Repository.open(backend, passphrase, known=KnownRepositories())
    except WrongPassphrase:
        backend.close()
        raise WrongPassphrase(f"wrong passphrase for the {side} repository {location} (from {where})") from None
