"""The processes running on this host, with their command lines (from /proc)."""

from __future__ import annotations

import os
from collections.abc import Iterator


def command_lines() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process whose command line can be read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv:
            yield int(entry), argv
