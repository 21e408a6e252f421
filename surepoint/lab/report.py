"""What a lab run found: per VM its boot, addresses and test results; written as JSON and as text."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from surepoint.lab.checks import CheckResult

PASSED = "passed"
FAILED = "failed"
NOT_RUN = "not run"


@dataclass
class VmResult:
    """One VM of the lab: a member of the application group or a restore point under verification."""

    name: str
    role: str  # group | verified
    restore_point: str
    point_name: str
    created: str
    consistency: str
    outcome: str = NOT_RUN  # passed | failed | not run
    reason: str = ""
    boot_seconds: float | None = None
    seconds: float = 0.0
    addresses: list[str] = field(default_factory=list)
    nics: list[dict] = field(default_factory=list)
    tests: list[CheckResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tests"] = [t.to_dict() for t in self.tests]
        return data


@dataclass
class LabReport:
    lab_id: str
    started: str
    repository: str
    network: dict = field(default_factory=dict)
    vms: list[VmResult] = field(default_factory=list)
    integrity: dict[str, str] = field(default_factory=dict)  # restore point id -> verified | damaged
    seconds: float = 0.0
    timed_out: bool = False
    cleanup: list[str] = field(default_factory=list)  # what could not be removed
    outcome: str = NOT_RUN

    def settle(self) -> None:
        """The lab passed when every VM passed its tests and every checked restore point is intact."""
        ok = bool(self.vms) and all(v.outcome == PASSED for v in self.vms)
        ok = ok and all(state == "verified" for state in self.integrity.values())
        self.outcome = PASSED if ok else FAILED

    def to_dict(self) -> dict:
        data = asdict(self)
        data["vms"] = [v.to_dict() for v in self.vms]
        return data

    def summary(self) -> str:
        lines = [
            f"surepoint recovery lab {self.lab_id}: {self.outcome.upper()}",
            f"started {self.started}, took {self.seconds:.1f} s, repository {self.repository}",
        ]
        net = self.network
        if net.get("isolated"):
            lines.append(
                f"network: namespace {net.get('namespace')}, bridge {net.get('bridge')} "
                f"{', '.join(net.get('addresses') or []) or '(no address)'}; no route out of the lab"
            )
        else:
            lines.append("network: none (VMs without network)")
        if self.timed_out:
            lines.append("the lab ran out of time: what had not run is marked not run")
        for vm in self.vms:
            lines.append("")
            boot = f", booted in {vm.boot_seconds:.1f} s" if vm.boot_seconds is not None else ""
            lines.append(
                f"{vm.role} VM {vm.name}: {vm.outcome.upper()} — restore point {vm.restore_point} "
                f"({vm.point_name}, {vm.created[:19].replace('T', ' ')}, {vm.consistency}-consistent){boot}"
            )
            if vm.reason:
                lines.append(f"  {vm.reason}")
            if vm.addresses:
                lines.append(f"  addresses in the lab: {', '.join(vm.addresses)}")
            for nic in vm.nics:
                changed = f" (was {nic.get('original_mac') or 'QEMU default'})" if nic.get("mac_changed") else ""
                lines.append(f"  network card on {nic.get('tap')}: MAC {nic.get('mac')}{changed}")
            for test in vm.tests:
                lines.append(f"  [{test.outcome:>7}] {test.name} ({test.seconds:.1f} s)")
                if test.outcome != PASSED and test.output:
                    for out_line in test.output.strip().splitlines()[-12:]:
                        lines.append(f"            {out_line}")
        if self.integrity:
            lines.append("")
            for point, state in self.integrity.items():
                lines.append(f"integrity of restore point {point}: {state}")
        for problem in self.cleanup:
            lines.append(f"cleanup problem: {problem}")
        if not self.cleanup:
            lines.append("cleanup: every lab VM, overlay, mount and the namespace removed")
        return "\n".join(lines) + "\n"

    def write(self, directory: str) -> tuple[str, str]:
        """REPORT_DIR/lab-<id>.json and .txt; their paths."""
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, f"lab-{self.lab_id}")
        with open(base + ".json", "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        with open(base + ".txt", "w") as f:
            f.write(self.summary())
        return base + ".json", base + ".txt"
