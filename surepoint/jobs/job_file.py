"""Job files (TOML): sources, writers, fallback and transaction-log policy, validated with clear errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from surepoint.errors import ConfigError
from surepoint.tomlfile import check_known, one_of, positive_seconds, read_toml

LOG_MODES = ("truncate", "keep", "copy-only", "after-verify")
FALLBACKS = ("try", "require")
WRITER_TYPES = ("fsfreeze", "postgresql", "mariadb", "sqlite", "script")
SNAPSHOTS = ("reflink", "none")


@dataclass
class JobConfig:
    name: str
    sources: list[str]
    writers: list[dict] = field(default_factory=list)
    fallback: str = "try"
    logs: str = "truncate"
    freeze_timeout: float = 20.0
    snapshot: str = "reflink"
    path: str = ""
    vm: str | None = None  # a running VM instead of sources: writers then run inside the guest
    fstrim: bool = False  # a VM job: ask the guest to trim first (disks with discard=unmap)


def load_job(path: str) -> JobConfig:
    return parse_job(read_toml(path, "job file"), path)


def parse_job(raw: dict, path: str = "<job>") -> JobConfig:
    try:
        return _parse_job(raw, path)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_job(raw: dict, path: str) -> JobConfig:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    check_known(
        raw, ("name", "sources", "vm", "writers", "fallback", "logs", "freeze_timeout", "snapshot", "fstrim"), path
    )
    vm = raw.get("vm")
    sources = raw.get("sources", [])
    if vm is not None:
        if not isinstance(vm, str) or not vm:
            raise bad('`vm` must be the name of a running VM, e.g. vm = "db01"')
        if sources:
            raise bad("give either `vm` (back up a running VM) or `sources` (image files), not both")
    elif not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise bad('`sources` must be a non-empty list of image or device paths, e.g. sources = ["/srv/db.img"]')
    if vm is not None and raw.get("name") not in (None, vm):
        raise bad("a VM job's restore points are named after the VM: drop `name` or set it to the VM's name")
    name = raw.get("name") or vm or os.path.basename(sources[0])
    if not isinstance(name, str):
        raise bad("`name` must be a string")
    fallback = one_of(raw.get("fallback", "try"), FALLBACKS, "`fallback`")
    logs = one_of(raw.get("logs", "truncate"), LOG_MODES, "`logs`")
    snapshot = one_of(raw.get("snapshot", "reflink"), SNAPSHOTS, "`snapshot`")
    timeout = positive_seconds(raw.get("freeze_timeout", 20), "`freeze_timeout`")
    writers = raw.get("writers", [])
    if not isinstance(writers, list):
        raise bad('`writers` must be an array of tables: [[writers]] type = "postgresql" ...')
    for i, writer in enumerate(writers):
        if not isinstance(writer, dict) or writer.get("type") not in WRITER_TYPES:
            got = writer.get("type") if isinstance(writer, dict) else writer
            raise bad(f"writer {i + 1}: `type` must be one of {', '.join(WRITER_TYPES)}, not {got!r}")
    if vm is not None and any(w["type"] == "fsfreeze" for w in writers):
        raise bad("inside a VM the guest's filesystems are frozen through the guest agent: drop the fsfreeze writer")
    fstrim = raw.get("fstrim", False)
    if not isinstance(fstrim, bool) or (fstrim and vm is None):
        raise bad("`fstrim` is true or false, and only for a VM job (`vm = ...`)")
    return JobConfig(name, list(sources), writers, fallback, logs, float(timeout), snapshot, path, vm, fstrim)
