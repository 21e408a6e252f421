"""What a session can run: each kind has a validated spec and becomes `surepoint ... --json` steps.

Kinds a job can have: files (disk images or block devices), vm (running VMs by name), job_file
(a job file with writers and log policy), verify (integrity), retention (forget + gc), lab
(recovery verification), copy (into another repository). Restore actions (restore, vm_restore,
restore_files, instant) run as sessions without a job.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surepoint.errors import UsageError
from surepoint.server.config import ServerConfig

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
Path = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
Ref = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:@+-]*$")]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def steps(self) -> list[list[str]]:
        raise NotImplementedError

    def plan(self, config: ServerConfig, repository: str) -> tuple[list[list[str]], dict[str, str]]:
        """The command lines to run against `repository`, and environment variables they need."""
        return self.steps(), {}

    def check(self, config: ServerConfig, repository: str) -> None:
        """UsageError for a spec that validates but could never run (a retention job without a rule)."""
        self.plan(config, repository)

    def protects(self) -> list[str]:
        """Names of the systems whose restore points this job makes (for RPO alerts)."""
        return []


class FilesSpec(Spec):
    paths: Annotated[list[Path], Field(min_length=1, max_length=64)]
    name: Name | None = None
    full: bool = False

    @field_validator("name")
    @classmethod
    def _no_dash(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("-"):
            raise ValueError("a name cannot start with '-'")
        return v

    def steps(self) -> list[list[str]]:
        argv = ["backup", *self.paths, "--json"]
        if self.name:
            argv += ["--name", self.name]
        if self.full:
            argv.append("--full")
        return [argv]

    def protects(self) -> list[str]:
        return [self.name or self.paths[0].rstrip("/").rsplit("/", 1)[-1]]


class VmSpec(Spec):
    """Running VMs by name, and by name pattern (shell-style, over the running QEMU processes,
    libvirt domains and the inventory file), expanded when the session starts."""

    vms: Annotated[list[Ref], Field(max_length=256)] = []
    patterns: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f-][^\x00-\x1f]*$")]],
        Field(max_length=64),
    ] = []
    inventory: Path | None = None
    parallel: Annotated[int, Field(ge=1, le=16)] = 2
    fallback: Literal["try", "require"] = "try"
    quiesce: bool = True
    full: bool = False

    @model_validator(mode="after")
    def _some_vm(self) -> VmSpec:
        if not self.vms and not self.patterns:
            raise ValueError("name VMs (vms) or name patterns (patterns)")
        return self

    def names(self) -> list[str]:
        """The VMs this session backs up: those named, and those a pattern matches now."""
        names = list(self.vms)
        if self.patterns:
            from surepoint.vm.inventory import load_inventory, running_vms

            known = {v.name for v in running_vms()}
            if self.inventory:
                known |= {v.name for v in load_inventory(self.inventory)}
            matched = sorted(n for n in known if any(fnmatch.fnmatchcase(n, p) for p in self.patterns))
            if not matched and not names:
                raise UsageError(f"no VM matches {', '.join(self.patterns)}")
            names += [n for n in matched if n not in names]
        return names

    def steps(self) -> list[list[str]]:
        argv = ["backup", "vm", *self.names(), "--json", "--parallel", str(self.parallel), "--fallback", self.fallback]
        if self.inventory:
            argv += ["--inventory", self.inventory]
        if not self.quiesce:
            argv.append("--no-quiesce")
        if self.full:
            argv.append("--full")
        return [argv]

    def check(self, config: ServerConfig, repository: str) -> None:
        pass  # which VMs a pattern matches is only known when the session starts

    def protects(self) -> list[str]:
        return list(self.vms)


class JobFileSpec(Spec):
    job_file: Path

    def steps(self) -> list[list[str]]:
        return [["backup", "--job", self.job_file, "--json"]]


class VerifySpec(Spec):
    restore_point: Ref | None = None
    sample: Annotated[float, Field(gt=0, le=100)] | None = None

    def steps(self) -> list[list[str]]:
        argv = ["verify", "--json"]
        if self.restore_point:
            argv.insert(1, self.restore_point)
        if self.sample:
            argv += ["--sample", str(self.sample)]
        return [argv]


Keep = Annotated[int, Field(ge=0, le=100000)]


class RetentionSpec(Spec):
    keep_last: Keep = 0
    keep_hourly: Keep = 0
    keep_daily: Keep = 0
    keep_weekly: Keep = 0
    keep_monthly: Keep = 0
    keep_yearly: Keep = 0
    name: Name | None = None
    gc: bool = True

    def steps(self) -> list[list[str]]:
        rules = {k: v for k, v in self.model_dump().items() if k.startswith("keep_") and v}
        if not rules:
            raise UsageError("a retention job needs at least one keep_* rule")
        argv = ["forget", "--json"]
        for key, value in rules.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        if self.name:
            argv += ["--name", self.name]
        return [argv, ["gc", "--json"]] if self.gc else [argv]


class LabSpec(Spec):
    targets: Annotated[list[Ref | Path], Field(min_length=1, max_length=64)]
    group: Path | None = None
    integrity: bool = True

    def steps(self) -> list[list[str]]:
        argv = ["lab", "verify", *self.targets, "--json"]
        if self.group:
            argv += ["--group", self.group]
        if not self.integrity:
            argv.append("--no-integrity")
        return [argv]


class RestoreSpec(Spec):
    restore_point: Ref
    to: Path
    disk: Annotated[int, Field(ge=0, le=1024)] = 0
    overwrite: bool = False

    def steps(self) -> list[list[str]]:
        argv = ["restore", self.restore_point, "--to", self.to, "--disk", str(self.disk)]
        return [argv + (["--overwrite"] if self.overwrite else [])]


class VmRestoreSpec(Spec):
    restore_point: Ref
    to: Path
    format: Literal["qcow2", "raw"] = "qcow2"
    start: bool = False

    def steps(self) -> list[list[str]]:
        argv = ["vm", "restore", self.restore_point, "--to", self.to, "--format", self.format, "--json"]
        return [argv + (["--start"] if self.start else [])]


class RestoreFilesSpec(Spec):
    restore_point: Ref
    paths: Annotated[list[Path], Field(min_length=1, max_length=64)]
    to: Path
    into_vm: Ref | None = None
    overwrite: bool = False

    def steps(self) -> list[list[str]]:
        argv = ["restore-files", self.restore_point, *self.paths, "--to", self.to, "--json"]
        if self.into_vm:
            argv += ["--into-vm", self.into_vm]
        return [argv + (["--overwrite"] if self.overwrite else [])]


class CopySpec(Spec):
    """Copy the restore points another configured repository lacks into it (3-2-1: the offsite copy)."""

    to: Annotated[str, Field(min_length=1, max_length=100)]
    names: Annotated[list[Name], Field(max_length=256)] = []
    bandwidth: Annotated[str, Field(pattern=r"^[0-9]+[KkMmGgTt]?(i?B)?$", max_length=20)] | None = None

    def steps(self) -> list[list[str]]:
        raise UsageError("a copy job needs the server's repositories to plan")

    def plan(self, config: ServerConfig, repository: str) -> tuple[list[list[str]], dict[str, str]]:
        source = config.repository(repository)
        target = config.repository(self.to)
        if target.name == source.name:
            raise UsageError("a copy job copies into another repository than its own")
        argv = ["copy", *self.names, "--from", source.location, "--to", target.location, "--json"]
        if self.bandwidth:
            argv += ["--bandwidth", self.bandwidth]
        env = {"SUREPOINT_FROM_PASSPHRASE_FILE": source.passphrase_file or "", "SUREPOINT_REPO": target.location}
        env["SUREPOINT_PASSPHRASE_FILE"] = target.passphrase_file or ""
        env["SUREPOINT_CATALOG"] = config.catalog_of(target)
        return [argv], {k: v for k, v in env.items() if v}


class InstantSpec(Spec):
    """Instant recovery: boot a VM from the repository, then migrate it to storage or discard it."""

    restore_point: Ref
    action: Literal["boot", "migrate", "discard"] = "boot"
    migrate_to: Path | None = None
    boot_timeout: Annotated[float, Field(gt=0, le=3600)] = 300

    def steps(self) -> list[list[str]]:
        argv = ["instant-recover", self.restore_point, "--json"]
        if self.action == "boot":
            return [argv + ["--boot-timeout", str(self.boot_timeout)]]
        if self.action == "discard":
            return [argv + ["--discard"]]
        if not self.migrate_to:
            raise UsageError("instant recovery: give migrate_to, the directory for the VM's disks")
        return [argv + ["--migrate-to", self.migrate_to]]


JOB_KINDS: dict[str, type[Spec]] = {
    "files": FilesSpec,
    "vm": VmSpec,
    "job_file": JobFileSpec,
    "verify": VerifySpec,
    "retention": RetentionSpec,
    "lab": LabSpec,
    "copy": CopySpec,
}
ACTION_KINDS: dict[str, type[Spec]] = {
    "restore": RestoreSpec,
    "vm_restore": VmRestoreSpec,
    "restore_files": RestoreFilesSpec,
    "instant": InstantSpec,
    "lab": LabSpec,
}
ALL_KINDS = {**JOB_KINDS, **ACTION_KINDS}


def parse_spec(kind: str, data: dict) -> Spec:
    """The spec of `kind` from `data`; UsageError with the first problem, in one line."""
    cls = ALL_KINDS.get(kind)
    if cls is None:
        raise UsageError(f"unknown kind {kind!r}: choose {', '.join(sorted(ALL_KINDS))}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{kind} spec: {describe_validation(exc.errors())}") from None


def _printable(text: object, limit: int = 60) -> str:
    """One line, whatever a client sent: control characters escaped, long names cut."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[:limit] + "..."


def describe_validation(errors: list) -> str:
    """The first problems pydantic found, as one line: `field.sub: message; ...`."""
    parts = []
    for e in errors[:3]:
        where = ".".join(_printable(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {_printable(e.get('msg', 'invalid'), 200)}")
    return "; ".join(parts)
