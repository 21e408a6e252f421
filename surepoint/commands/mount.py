"""Commands that serve restore points straight from the repository (mount, file-level restore)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
