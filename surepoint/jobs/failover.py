"""Failover jobs: fail a VM over to its replica (at a chosen point, or planned with no data loss),
undo it, make it permanent, and run failover plans of several VMs in order.

A planned failover shuts the source down cleanly first, keeping its QEMU process (QMP
`set-action shutdown=pause`: the guest powers off, QEMU stays with its disks and monitor), runs one
last replication cycle of the quiet disks, then quits the source and boots the replica at that
last point: nothing the guest committed before its shutdown is lost. If that last cycle fails, the
source is started again (system_reset, cont) and the failover is not done.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import InvalidArgument, SurepointError, TargetError
from surepoint.replica.errors import ReplicaNotFound
from surepoint.replica.failover import (
    ACPI_AFTER,
    ReplicaLabTarget,
    ask_guest_to_power_off,
    boot_spec,
    failover,
    make_permanent,
    parse_replica_ref,
    undo_failover,
    wait_gone,
)
from surepoint.replica.layout import FAILED_OVER, ReplicaDir, default_name
from surepoint.replica.netmap import NetworkRule
from surepoint.replica.plan import FailoverPlan, UpCheck
from surepoint.replica.reip import ReipRule, apply_reip
from surepoint.text import printable
from surepoint.vm.errors import GuestAgentError, QmpError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.inventory import find_vm
from surepoint.vm.qmp import QmpConnection

Say = Callable[[str], None]
Replicate = Callable[[str], object]  # one replication cycle of the VM NAME into its replica
SOURCE_SHUTDOWN_TIMEOUT = 300.0
ADDRESS_WAIT = 60.0


def _quiet(_m: str) -> None:
    pass


def open_replica(target: str, vm: str) -> ReplicaDir:
    """The replica of `vm` under `target` (TARGET/NAME-replica); ReplicaNotFound naming both."""
    path = os.path.join(os.path.abspath(target), default_name(vm))
    try:
        return ReplicaDir.open(path)
    except ReplicaNotFound:
        raise ReplicaNotFound(f"VM {printable(vm)} has no replica in {target} (no {path})") from None


def replica_lab_target(ref: str) -> ReplicaLabTarget:
    """`replica:DIR[@POINT]` (DIR the replica directory, POINT an id, `latest` or a time) for the lab."""
    path, point = parse_replica_ref(ref)
    return ReplicaLabTarget(boot_spec(ReplicaDir.open(path), point))


def failover_vm(
    target: str,
    vm: str,
    point: str = "latest",
    *,
    planned: bool = False,
    replicate: Replicate | None = None,
    boot_timeout: float = 300,
    network: list[NetworkRule] | None = None,
    reip: list[ReipRule] | None = None,
    inventory: str | None = None,
    log: Say | None = None,
) -> dict:
    """Fail `vm` over to its replica under `target`; the record's failover entry (with timings)."""
    say = log or _quiet
    replica = open_replica(target, vm)
    started = time.monotonic()
    result: dict = {}
    if planned:
        if point != "latest":
            raise InvalidArgument("a planned failover boots the point its last replication makes: no --point")
        if replicate is None:
            raise InvalidArgument("a planned failover needs replication to send the last changes")
        if replica.state == FAILED_OVER:
            raise InvalidArgument(f"{printable(vm)} is failed over already")
        result["source"] = planned_shutdown(vm, replicate, inventory=inventory, log=say)
        replica = open_replica(target, vm)
    entry = failover(replica, point, boot_timeout=boot_timeout, network=network, planned=planned, log=say)
    if reip:
        entry["reip"] = reip_guest(entry["guest_agent"], reip, log=say)
        with replica:
            if replica.failover is not None:
                replica.failover["reip"] = entry["reip"]
                replica.save()
    entry = dict(entry, **result)
    entry["seconds"] = round(time.monotonic() - started, 2)
    return entry


def planned_shutdown(vm: str, replicate: Replicate, *, inventory: str | None = None, log: Say | None = None) -> dict:
    """Shut the source VM down cleanly, replicate its final state, then quit its QEMU; what was done."""
    say = log or _quiet
    info = find_vm(vm, inventory)
    if info.libvirt_uri:
        raise InvalidArgument(f"a planned failover of the libvirt domain {printable(vm)} is not supported yet")
    began = time.monotonic()
    # one QMP client at a time: each step opens its own connection, so the replication cycle can open its own
    with QmpConnection(info.qmp, timeout=30) as qmp:
        qmp.execute("set-action", shutdown="pause")  # the guest powers off; QEMU stays for the last cycle
        how = ask_guest_to_power_off(info.guest_agent)
        if how is None:
            how = "ACPI power button"
            qmp.execute("system_powerdown")
        say(f"shutting down {printable(vm)} (through its {how})")
        deadline = time.monotonic() + SOURCE_SHUTDOWN_TIMEOUT
        acpi_at = time.monotonic() + ACPI_AFTER
        while qmp.execute("query-status").get("status") != "shutdown":
            if time.monotonic() > acpi_at and "ACPI" not in how:
                how += " and the ACPI power button"
                qmp.execute("system_powerdown")
            if time.monotonic() > deadline:
                qmp.execute("set-action", shutdown="poweroff")
                raise TargetError(f"{printable(vm)} did not shut down within {SOURCE_SHUTDOWN_TIMEOUT:.0f} s")
            time.sleep(0.3)
    shutdown_seconds = time.monotonic() - began
    say(f"{printable(vm)} is shut down ({shutdown_seconds:.1f} s); sending the last changes")
    try:
        last = replicate(vm)
    except BaseException:
        say(f"the last replication failed: starting {printable(vm)} again")
        with contextlib.suppress(QmpError), QmpConnection(info.qmp, timeout=30) as qmp:
            qmp.execute("set-action", shutdown="poweroff")
            qmp.execute("system_reset")
            qmp.execute("cont")
        raise
    with contextlib.suppress(QmpError), QmpConnection(info.qmp, timeout=30) as qmp:
        qmp.execute("quit")
    if info.pid is not None and not wait_gone(info.pid, None, 30):
        raise TargetError(f"the source VM's QEMU (pid {info.pid}) did not quit")
    return {
        "shutdown": how,
        "shutdown_seconds": round(shutdown_seconds, 2),
        "last_replication": _as_dict(last),
    }


def reip_guest(agent_path: str, rules: list[ReipRule], *, log: Say | None = None) -> list[str]:
    """Re-IP the guest through its agent; the changes made (printable)."""
    say = log or _quiet
    with GuestAgent(agent_path, timeout=60) as ga:
        changes = apply_reip(ga, rules)
    for change in changes:
        say(change)
    if not changes:
        say("re-IP: no address of the guest's configuration is in a source subnet")
    return changes


def undo(target: str, vm: str, *, log: Say | None = None) -> dict:
    return undo_failover(open_replica(target, vm), log=log)


def permanent(target: str, vm: str, *, log: Say | None = None) -> dict:
    return make_permanent(open_replica(target, vm), log=log)


# -- plans -------------------------------------------------------------------------------------


@dataclass
class PlanStep:
    vm: str
    outcome: str  # "up", "failed", "not run", "undone", "skipped"
    detail: str = ""
    seconds: float = 0.0
    point: str | None = None
    checks: list[str] = field(default_factory=list)


def run_plan(plan: FailoverPlan, *, undo_plan: bool = False, log: Say | None = None) -> list[PlanStep]:
    """Fail the plan's VMs over in order (each up before the next, with its delay), or undo it in
    reverse order. A VM that fails stops the plan: the ones after it are not run."""
    say = log or _quiet
    steps: list[PlanStep] = []
    if undo_plan:
        for item in reversed(plan.vms):
            began = time.monotonic()
            try:
                replica = open_replica(item.target, item.name)
                if replica.state != FAILED_OVER:
                    steps.append(PlanStep(item.name, "skipped", f"not failed over ({replica.state})"))
                    continue
                entry = undo_failover(replica, log=say)
                steps.append(PlanStep(item.name, "undone", "", round(time.monotonic() - began, 1), entry.get("point")))
            except SurepointError as exc:
                steps.append(PlanStep(item.name, "failed", str(exc), round(time.monotonic() - began, 1)))
        return steps
    failed = None
    for n, item in enumerate(plan.vms):
        if failed is not None:
            steps.append(PlanStep(item.name, "not run", f"{failed} failed"))
            continue
        began = time.monotonic()
        say(f"plan: {printable(item.name)} ({n + 1} of {len(plan.vms)})")
        try:
            entry = failover_vm(
                item.target,
                item.name,
                item.point,
                boot_timeout=item.boot_timeout,
                network=item.network,
                reip=item.reip,
                log=say,
            )
            checks = check_up(entry["guest_agent"], item.check, log=say)
        except SurepointError as exc:
            steps.append(PlanStep(item.name, "failed", str(exc), round(time.monotonic() - began, 1)))
            failed = item.name
            continue
        steps.append(PlanStep(item.name, "up", "", round(time.monotonic() - began, 1), entry.get("point"), checks))
        if item.delay and n + 1 < len(plan.vms):
            say(f"plan: waiting {item.delay:g} s before the next VM")
            time.sleep(item.delay)
    return steps


def check_up(agent_path: str, check: UpCheck, *, log: Say | None = None) -> list[str]:
    """The plan's check that a VM is up (guest agent, then port, then command); what passed.

    TargetError naming the first check that did not pass within its timeout.
    """
    say = log or _quiet
    deadline = time.monotonic() + check.timeout
    passed = []
    with GuestAgent(agent_path, timeout=30) as ga:
        ga.ping()
        passed.append("guest agent answers")
        if check.port is not None:
            address = check.address or _first_address(ga, deadline)
            while not _port_open(address, check.port):
                if time.monotonic() > deadline:
                    raise TargetError(f"port {check.port} on {address} did not open within {check.timeout:g} s")
                time.sleep(1.0)
            passed.append(f"port {check.port} on {address} open")
        if check.command:
            while True:
                done = ga.exec(check.command, timeout=max(1.0, deadline - time.monotonic()))
                if done.ok:
                    break
                if time.monotonic() > deadline:
                    out = printable(done.stderr.decode(errors="replace").strip()[-200:])
                    raise TargetError(f"check {check.command!r} still fails (exit {done.exitcode}): {out}")
                time.sleep(2.0)
            passed.append(f"{' '.join(printable(a) for a in check.command)} succeeded")
    for line in passed:
        say(f"  check: {line}")
    return passed


def _first_address(ga: GuestAgent, deadline: float) -> str:
    until = min(deadline, time.monotonic() + ADDRESS_WAIT)
    while True:
        try:
            for iface in ga.execute("guest-network-get-interfaces") or []:
                if iface.get("name") == "lo":
                    continue
                for addr in iface.get("ip-addresses", []):
                    if addr.get("ip-address-type") == "ipv4":
                        return str(addr["ip-address"])
        except GuestAgentError:
            pass
        if time.monotonic() > until:
            raise TargetError("the guest reports no IPv4 address for the port check (give check.address)")
        time.sleep(1.0)


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


def _as_dict(result: object) -> dict | None:
    if isinstance(result, dict):
        return result
    to_json = getattr(result, "to_json", None)
    if callable(to_json):
        return to_json()
    fields = getattr(result, "__dataclass_fields__", None)
    return (
        {k: getattr(result, k) for k in fields if isinstance(getattr(result, k), str | int | float)} if fields else None
    )
