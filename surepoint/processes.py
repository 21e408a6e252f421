"""Processes on this host, from /proc: command lines, liveness, start times.

A pid alone can be reused after its process exits; a (pid, start time) pair cannot, so records
of running things (mounts, instant VMs, labs, server sessions) keep both and compare both.
"""

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


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
    [0] is the state, [19] the start time. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks after boot (field 22 of /proc/PID/stat), None if gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def is_zombie(pid: int) -> bool:
    """The process has exited but was not reaped yet (or is gone)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"  # unreadable stat: it was there a moment ago


def same_process(pid: int | None, start: int | None) -> bool:
    """`pid` still runs the process that started at `start` (not a reused pid), and is not a zombie."""
    return pid is not None and start is not None and process_start(pid) == start and not is_zombie(pid)
