"""Recovery verification: boot restore points in an isolated lab and run their tests.

The order follows the application group: each group VM boots from its restore point (an instant
recovery: qcow2 overlays over the read-only repository mount, so the repository is never written)
and must pass its tests before the next one starts; the restore points under verification start
once the whole group is healthy, one after the other, each stopped when its tests are done
(the group runs until the end). Every QEMU runs in the lab's network namespace, its network
cards moved onto the lab's bridge, so the VMs keep their production addresses and cannot reach
anything outside the lab; the ping and port tests run from inside the namespace.

Then the chunks of every restore point that booted are checked (integrity), everything the lab made
is removed, and each VM's outcome is recorded in the catalog as a "recovery" verification: a
restore point counts as verified only with both records passed. The whole run is bounded by the
lab's timeout; a lab that dies is cleaned up by the next one (surepoint.lab.records).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict

from surepoint.catalog import Catalog
from surepoint.errors import InvalidArgument, NeedsRoot, NotAVmBackup, SurepointError
from surepoint.events import Component, EventRecorder, Outcome, Phase
from surepoint.interrupt import checkpoint
from surepoint.lab.checks import CheckContext, CheckResult, guest_addresses, run_check
from surepoint.lab.lab_file import LabConfig, LabVmSpec
from surepoint.lab.network import BRIDGE, LabNetwork, attach_to_lab, namespace_for
from surepoint.lab.records import LabState, clean_leftovers, new_lab_id, teardown_lab
from surepoint.lab.report import FAILED, NOT_RUN, PASSED, LabReport, VmResult
from surepoint.mount.instant import discard_instant, start_instant
from surepoint.mount.manager import MountOptions
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.verify import VerifyReport
from surepoint.repo.verify import verify as run_verify
from surepoint.timestamps import utc_now

ADDRESS_WAIT = 60.0  # seconds to wait for a VM's network to come up when a test needs its address
NEEDS_ADDRESS = ("ping", "port")


def check_bootable(point: RestorePoint) -> None:
    vm = point.metadata.get("vm")
    if not vm:
        raise NotAVmBackup(f"restore point {point.id} ({point.name}) is not a VM backup: a lab can only boot VMs")
    if not vm.get("command_line"):
        raise NotAVmBackup(f"restore point {point.id} ({point.name}) has no saved QEMU command line: it cannot boot")


class Lab:
    """One run of the lab; `run` returns its report after everything was torn down."""

    def __init__(
        self,
        repository: Repository,
        catalog: Catalog,
        config: LabConfig,
        targets: list[RestorePoint],
        *,
        integrity: bool = True,
        check_integrity: Callable[[list[RestorePoint]], VerifyReport] | None = None,
        mount_options: MountOptions | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.repository = repository
        self.catalog = catalog
        self.events = EventRecorder(catalog, repository.id)
        self.config = config
        self.targets = targets
        self.integrity = integrity
        # how the booted points' chunks are checked (the verify job records the outcome in the catalog)
        self.check_integrity = check_integrity or (lambda points: run_verify(self.repository, points))
        self.mount_options = mount_options or MountOptions()
        self.say = log or (lambda _m: None)
        self.used_macs: set[str] = set()
        self.network: LabNetwork | None = None
        self.deadline = 0.0
        self.booted: list[RestorePoint] = []  # the restore points whose VM started, each once
        self.keep_running = False  # an open lab (surepoint.lab.opening): VMs stay up after their tests

    def run(self) -> LabReport:
        if os.geteuid() != 0:
            raise NeedsRoot("the lab needs root (a network namespace, FUSE mounts of the repository)")
        if not self.targets:
            raise InvalidArgument("no restore point to verify")
        clean_leftovers(self.say)
        group = [(spec, self.repository.resolve(spec.restore_point or "")) for spec in self.config.group]
        for point in [p for _s, p in group] + self.targets:
            check_bootable(point)
        lab_id = new_lab_id()
        started = time.monotonic()
        self.deadline = started + self.config.timeout
        state = LabState(lab_id, namespace_for(lab_id), deadline=time.time() + self.config.timeout)
        state.save()
        report = LabReport(
            lab_id=lab_id,
            started=utc_now(),
            repository=self.repository.id,
            network={
                "namespace": state.namespace,
                "isolated": self.config.network == "isolated",
                "bridge": BRIDGE if self.config.network == "isolated" else None,
                "addresses": list(self.config.addresses),
            },
        )
        self.events.record(
            Component.LAB,
            Phase.START,
            Outcome.OK,
            f"lab {lab_id}: {len(group)} group VM(s), {len(self.targets)} to verify",
        )
        try:
            self.network = LabNetwork.create(
                state.namespace, self.config.addresses, isolated=self.config.network == "isolated"
            )
            state.status = "running"
            state.save()
            failed_member: VmResult | None = None
            plan = [(spec, point) for spec, point in group]
            plan += [(self.config.spec_for(point.name), point) for point in self.targets]
            for number, (spec, point) in enumerate(plan):
                if failed_member is not None:
                    reason = f"not started: application group VM {failed_member.name} failed"
                    report.vms.append(self._result(spec, point, NOT_RUN, reason))
                    continue
                result = self._run_vm(spec, point, number, state)
                report.vms.append(result)
                if spec.role == "group" and result.outcome != PASSED:
                    failed_member = result
            report.timed_out = time.monotonic() > self.deadline
            ran = {v.restore_point for v in report.vms if v.outcome != NOT_RUN}
            self.booted = list({p.id: p for _s, p in plan if p.id in ran}.values())
            if self.integrity:
                report.integrity = self._check_integrity(self.booted)
        finally:
            state.status = "tearing-down"
            state.save()
            self.say(f"lab {lab_id}: tearing down")
            report.cleanup = teardown_lab(state, self.say)
            report.seconds = round(time.monotonic() - started, 1)
        report.settle()
        self._record(report)
        return report

    # one VM -------------------------------------------------------------------------------

    def _result(self, spec: LabVmSpec, point: RestorePoint, outcome: str, reason: str = "") -> VmResult:
        return VmResult(
            name=spec.name if spec.role == "group" else point.name,
            role=spec.role,
            restore_point=point.id,
            point_name=point.name,
            created=point.created,
            consistency=point.consistency,
            outcome=outcome,
            reason=reason,
        )

    def _run_vm(self, spec: LabVmSpec, point: RestorePoint, number: int, state: LabState) -> VmResult:
        result = self._result(spec, point, NOT_RUN)
        remaining = self.deadline - time.monotonic()
        if remaining <= 1:
            result.reason = "the lab's timeout was reached before this VM could start"
            return result
        started = time.monotonic()
        label = re.sub(r"[^A-Za-z0-9._-]", "-", result.name)[:40]
        workdir = os.path.join(state.directory, f"vm{number}-{label}")
        state.vm_workdirs.append(workdir)
        state.save()
        assert self.network is not None
        network = self.network
        nics = []

        def prepare(argv: list[str]) -> list[str]:
            new_argv, plans = attach_to_lab(argv, network.add_tap, self.used_macs)
            nics.extend(plans)
            return new_argv

        self.say(f"{result.role} VM {result.name}: booting restore point {point.id} in the lab")
        try:
            # a replica state boots itself (replica.failover.ReplicaLabTarget); a restore point from the repository
            start = getattr(point, "boot", None) or functools.partial(start_instant, self.repository, point)
            session = start(
                workdir,
                boot_timeout=min(spec.boot_timeout, remaining),
                options=MountOptions(cache_bytes=self.mount_options.cache_bytes, reader="lab"),
                log=self.say,
                name=f"lab-{state.lab_id}-{label}",
                command_prefix=network.command_prefix(),
                prepare_argv=prepare,
            )
        except SurepointError as exc:
            result.outcome = FAILED
            result.reason = f"did not boot: {exc}"
            result.seconds = round(time.monotonic() - started, 1)
            result.nics = [asdict(n) for n in nics]
            self.events.record(
                Component.LAB, Phase.BOOT, Outcome.FAILED, f"{result.name}: {exc}", restore_point=point.id
            )
            return result
        result.boot_seconds = session.boot_seconds
        result.nics = [asdict(n) for n in nics]
        self.events.record(
            Component.LAB,
            Phase.BOOT,
            Outcome.OK,
            f"{result.name}: guest agent answered after {session.boot_seconds} s",
            restore_point=point.id,
        )
        isolated = self.config.network == "isolated"
        context = CheckContext(
            vm=result.name,
            guest_agent=session.guest_agent,
            network_prefix=network.command_prefix() if isolated else None,
            addresses=[],
            deadline=self.deadline,
        )
        for test in spec.tests:
            checkpoint("lab-test")
            if time.monotonic() >= self.deadline:
                result.tests.append(CheckResult(test.name, test.type, "timeout", "the lab's timeout was reached", 0.0))
                continue
            if test.type in NEEDS_ADDRESS and not test.options.get("address") and not context.addresses:
                context.addresses = self._wait_for_addresses(session.guest_agent)
            outcome = run_check(test, context)
            result.tests.append(outcome)
            self.events.record(
                Component.LAB,
                f"test {test.name}",
                Outcome.OK if outcome.outcome == PASSED else outcome.outcome,
                _short(outcome),
                restore_point=point.id,
            )
            self.say(f"{result.name}: {test.name}: {outcome.outcome} ({outcome.seconds:.1f} s)")
            if test.type == "heartbeat" and outcome.outcome != PASSED:
                break  # nothing else can run in a VM whose agent does not answer
        if not context.addresses and isolated and session.guest_agent:
            context.addresses = _quiet_addresses(session.guest_agent)
        result.addresses = context.addresses
        ran_all = len(result.tests) == len(spec.tests)
        result.outcome = PASSED if ran_all and all(t.outcome == PASSED for t in result.tests) else FAILED
        if result.outcome == FAILED:
            bad = [t.name for t in result.tests if t.outcome != PASSED]
            result.reason = f"failed: {', '.join(bad)}" if bad else "not every test ran"
        result.seconds = round(time.monotonic() - started, 1)
        if spec.role == "verified" and not self.keep_running:
            # its tests are done and nothing depends on it: free its memory before the next one boots
            try:
                discard_instant(workdir, log=self.say)
            except SurepointError as exc:
                self.say(f"{result.name}: could not stop it yet ({exc}); the lab's teardown will")
        return result

    def _wait_for_addresses(self, agent_path: str | None) -> list[str]:
        if not agent_path:
            return []
        until = min(self.deadline, time.monotonic() + ADDRESS_WAIT)
        while True:
            found = _quiet_addresses(agent_path)
            if found or time.monotonic() >= until:
                return found
            time.sleep(1.0)

    # afterwards -----------------------------------------------------------------------------

    def _check_integrity(self, points: list[RestorePoint]) -> dict[str, str]:
        """Re-read and check every chunk of the restore points that booted (recorded as integrity checks)."""
        points = [p for p in points if not hasattr(p, "boot")]  # a replica state has no chunks
        if not points:
            return {}
        self.say(f"checking the chunks of {len(points)} restore point(s)")
        verified = self.check_integrity(points)
        return {p.id: p.state for p in verified.points}

    def _record(self, report: LabReport) -> None:
        for vm in report.vms:
            if vm.outcome == NOT_RUN:
                self.events.record(
                    Component.LAB,
                    Phase.VERIFY,
                    Outcome.SKIPPED,
                    f"{vm.name}: {vm.reason}",
                    restore_point=vm.restore_point,
                )
                continue
            state = "verified" if vm.outcome == PASSED else "failed"
            details = dict(vm.to_dict(), lab_id=report.lab_id, lab_outcome=report.outcome)
            self.catalog.record_verification(self.repository.id, vm.restore_point, "recovery", state, details)
            self.events.record(
                Component.LAB,
                Phase.VERIFY,
                Outcome.OK if state == "verified" else Outcome.FAILED,
                f"{vm.name}: {vm.outcome}",
                restore_point=vm.restore_point,
            )
        self.events.record(
            Component.LAB,
            Phase.FINISH,
            Outcome.OK if report.outcome == PASSED else Outcome.FAILED,
            f"lab {report.lab_id}: {report.outcome} in {report.seconds} s",
        )


def _quiet_addresses(agent_path: str) -> list[str]:
    try:
        return guest_addresses(agent_path, timeout=10)
    except SurepointError:
        return []


def _short(result: CheckResult) -> str:
    text = " ".join(result.output.split())
    return text[:300] + ("…" if len(text) > 300 else "")
