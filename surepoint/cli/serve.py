"""`surepoint serve`: the far end of an ssh:// repository, run by sshd (usually as a forced command).

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

import os
import shlex
import sys
from typing import Annotated

import typer

from surepoint.errors import UsageError


def _forced_path_note(path: str) -> None:
    """A client that asked for another path than the forced command serves gets a note on stderr."""
    try:
        words = shlex.split(os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    except ValueError:
        return
    if len(words) >= 3 and words[-2] == "serve" and os.path.abspath(words[-1]) != os.path.abspath(path):
        sys.stderr.write(f"surepoint serve: this key serves {path} only (the client asked for {words[-1]})\n")


def register(app: typer.Typer) -> None:
    """Add `serve` to the main app."""

    @app.command("serve")
    def serve(
        path: Annotated[str, typer.Argument(help="Repository directory on this host.")],
        append_only: Annotated[
            bool,
            typer.Option(
                "--append-only",
                help="Clients may add restore points but never overwrite, move or delete what exists.",
            ),
        ] = False,
    ) -> None:
        """Serve a repository to one ssh:// client on stdin/stdout (sshd runs this; not for a terminal).

        In authorized_keys: command="surepoint serve --append-only /srv/repo",restrict ssh-ed25519 AAAA...
        """
        from surepoint.remote.server import serve as run_server

        if sys.stdin.isatty():
            raise UsageError("surepoint serve speaks the repository protocol on stdin/stdout: sshd runs it")
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        _forced_path_note(path)
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
        sys.stdout = sys.stderr  # nothing but protocol messages may reach the client's stdout
        run_server(path, append_only=append_only, stdin=stdin, stdout=stdout)
