"""Failback job: write what the replica VM changed back into the original VM and switch to it."""

from __future__ import annotations

from collections.abc import Callable

from surepoint.jobs.failover import open_replica
from surepoint.replica.failback import failback


def failback_vm(
    target: str,
    vm: str,
    *,
    to: str = "original",
    start: bool = True,
    boot_timeout: float = 300,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fail `vm` back from its replica under `target` to the original disks (or to a new location)."""
    return failback(open_replica(target, vm), to=to, start=start, boot_timeout=boot_timeout, log=log)
