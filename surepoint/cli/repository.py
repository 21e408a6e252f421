"""Repository commands: `version`, `init`, `passwd`, `unlock`."""

from __future__ import annotations

from typing import Annotated

import typer

from surepoint import __version__, storage
from surepoint.cli.common import Context, out, read_passphrase
from surepoint.errors import UsageError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.repo.known import KnownRepositories
from surepoint.repo.locks import read_locks, remove_stale_locks
from surepoint.repo.repository import COMPRESSION_LEVELS, DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, Repository

ENCRYPTIONS = ("none", "aes-256-gcm", "chacha20-poly1305")


def version() -> None:
    """Print the version."""
    out.print(f"surepoint {__version__}")


def init(
    ctx: typer.Context,
    encryption: Annotated[
        str, typer.Option(help="none, aes-256-gcm or chacha20-poly1305.", case_sensitive=False)
    ] = "aes-256-gcm",
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes (power of two).")] = DEFAULT_CHUNK_SIZE,
    compression_level: Annotated[
        int, typer.Option(help="zstd level: 1 (fast, the default) to 19 (small), or -7 to -1 (fastest).")
    ] = DEFAULT_COMPRESSION_LEVEL,
    immutable_days: Annotated[
        int | None,
        typer.Option(help="Lock every object for N days, forever-incremental (s3:// bucket with Object Lock).", min=1),
    ] = None,
) -> None:
    """Create a new repository."""
    c: Context = ctx.obj
    encryption = encryption.lower()
    if encryption not in ENCRYPTIONS:
        raise UsageError(f"unknown encryption {encryption!r}: choose none, aes-256-gcm or chacha20-poly1305")
    if compression_level not in COMPRESSION_LEVELS or compression_level > 19:
        raise UsageError(f"--compression-level {compression_level}: choose 1 to 19, or -7 to -1")
    passphrase = c.passphrase(confirm=True) if encryption != "none" else None
    backend = storage.open(c.location(), create=True)
    if immutable_days is not None:
        if not hasattr(backend, "make_immutable"):
            raise UsageError("--immutable-days needs an s3:// repository on a bucket with Object Lock")
        backend.make_immutable(immutable_days)
    repo = Repository.create(
        backend,
        encryption=encryption,
        passphrase=passphrase,
        chunk_size=chunk_size,
        compression_level=compression_level,
        known=KnownRepositories(),
    )
    out.print(f"created repository {repo.id} at {backend.location} (encryption: {repo.encryption})")


def passwd(
    ctx: typer.Context,
    new_passphrase_file: Annotated[
        str | None,
        typer.Option(envvar="SUREPOINT_NEW_PASSPHRASE_FILE", help="Read the new passphrase from a file."),
    ] = None,
) -> None:
    """Change the repository passphrase (the data keys stay; only their wrapping changes)."""
    c: Context = ctx.obj
    repo = c.open_repository()
    new = read_passphrase(
        env_var="SUREPOINT_NEW_PASSPHRASE",
        file=new_passphrase_file,
        prompt="new passphrase",
        repeat_prompt="repeat new passphrase",
        confirm=True,
        missing="give the new passphrase in SUREPOINT_NEW_PASSPHRASE or --new-passphrase-file",
    )
    repo.change_passphrase(c.passphrase(), new)
    EventRecorder(c.catalog(), repo.id).record(Component.REPOSITORY, Phase.PASSWD, Outcome.OK, "passphrase changed")
    out.print(f"passphrase of repository {repo.id} changed")


def unlock(ctx: typer.Context) -> None:
    """Remove locks left by processes that are gone (this host) or abandoned (other hosts)."""
    c: Context = ctx.obj
    backend = storage.open(c.location())
    removed = remove_stale_locks(backend)
    remaining = read_locks(backend)
    out.print(f"removed {len(removed)} stale lock(s); {len(remaining)} lock(s) still held")
    for lock in remaining:
        out.print(f"  {lock.describe()}")


def register(app: typer.Typer) -> None:
    app.command()(version)
    app.command()(init)
    app.command()(passwd)
    app.command()(unlock)
    app.command()(unlock)
