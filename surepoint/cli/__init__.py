"""The `surepoint` command line: the app, its global options and one module per command group."""

from surepoint.cli.app import app, main

__all__ = ["app", "main"]
