"""Malware scans of restore points: YARA rules over every filesystem of a mounted point, and the
walk back to the newest point that is clean.

A point is mounted read-only (an existing mount of it is reused), each filesystem is scanned with
guest paths (the root filesystem's /etc/fstab tells where the others are mounted in the guest),
and the result is kept in the catalog as a verification of kind "malware-scan".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.catalog import Catalog
from surepoint.errors import SurepointError
from surepoint.jobs.guest_volumes import mount_options
from surepoint.jobs.progress import Log, no_log
from surepoint.mount.borrowed import point_mounted
from surepoint.mount.records import MountState
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.scan.signals import suspicious_points
from surepoint.scan.yara_scan import FileMatch, Rules, ScanReport, scan_tree
from surepoint.text import printable

SCAN_KIND = "malware-scan"


@dataclass
class VolumeScan:
    disk: int
    volume: str
    fstype: str
    guest_mount: str | None  # where the guest mounts it ("/", "/boot"), when its fstab says so

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PointScan:
    point: RestorePoint
    rules: Rules
    report: ScanReport = field(default_factory=ScanReport)
    volumes: list[VolumeScan] = field(default_factory=list)
    not_scanned: list[dict] = field(default_factory=list)  # volumes the mount could not mount

    def to_json(self) -> dict:
        return {
            "restore_point": self.point.id,
            "name": self.point.name,
            "rules": self.rules.path,
            "rules_sha256": self.rules.sha256,
            "volumes": [v.to_json() for v in self.volumes],
            "not_mounted": self.not_scanned,
            **self.report.to_json(),
        }


def scan_point(
    repository: Repository,
    point: RestorePoint,
    rules: Rules,
    catalog: Catalog | None = None,
    *,
    log: Log = no_log,
    on_match: Callable[[FileMatch], None] | None = None,
) -> PointScan:
    """Mount `point` read-only, run `rules` over the files of every filesystem, record the outcome."""
    with point_mounted(repository, point, mount_options(), purpose="scan", say=log) as state:
        result = PointScan(point, rules, not_scanned=list(state.skipped))
        if not state.mounts:
            raise SurepointError(f"restore point {point.id} has no filesystem that can be mounted")
        places = guest_places(state)
        for m in state.mounts:
            where = places.get(m["path"])
            volume = VolumeScan(m["disk"], m["volume"], m["fstype"], where)
            result.volumes.append(volume)
            prefix = where or f"[disk {m['disk']} {m['volume']}]/"
            log(f"scanning disk {m['disk']} {m['volume']} ({m['fstype']}) as {printable(prefix)}")
            scan_tree(rules, m["path"], prefix, result.report, on_match=on_match)
    if catalog is not None:
        details = result.to_json()
        details["matches"] = details["matches"][:1000]
        details["errors"] = details["errors"][:100]
        details["skipped"] = details["skipped"][:100]
        catalog.record_verification(repository.id, point.id, SCAN_KIND, result.report.outcome, details)
    return result


def guest_places(state: MountState) -> dict[str, str]:
    """Host mount path -> where the guest mounts that filesystem, from the mount's guest layout (its fstab)."""
    layout = state.guest.get("layout") or {}
    places = {m["path"]: m["mountpoint"] for m in layout.get("mounts", []) if m.get("path")}
    if not places and len(state.mounts) == 1:
        places = {state.mounts[0]["path"]: "/"}  # one filesystem and no fstab to say otherwise
    return places


@dataclass
class CleanSearch:
    clean: RestorePoint | None
    passed_over: list[dict] = field(default_factory=list)  # {"restore_point", "reason"}, newest first

    def to_json(self) -> dict:
        return {"clean": self.clean.id if self.clean else None, "passed_over": self.passed_over}


def find_clean(
    repository: Repository,
    name: str,
    rules: Rules | None,
    catalog: Catalog,
    *,
    log: Log = no_log,
) -> CleanSearch:
    """The newest restore point of `name` with no change signal and no YARA match.

    With `rules`, each candidate is scanned (newest first) until one is clean; without, the last
    recorded scan of each point counts, and a point never scanned counts as clean if it has no signal.
    """
    series = [p for p in repository.list_restore_points() if p.name == name]
    if not series:
        raise SurepointError(f"no restore point named {printable(name)}")
    signals = suspicious_points(series)
    search = CleanSearch(None)
    for point in sorted(series, key=lambda p: p.created, reverse=True):
        if point.id in signals:
            search.passed_over.append({"restore_point": point.id, "reason": f"suspicious: {signals[point.id]}"})
            log(f"{point.id}: suspicious: {signals[point.id]}")
            continue
        if rules is not None:
            report = scan_point(repository, point, rules, catalog, log=log).report
            outcome, when = report.outcome, "now"
            matches, errors = len(report.matches), len(report.errors)
        else:
            last = catalog.latest_verification(repository.id, point.id, SCAN_KIND)
            if last is None:
                search.clean = point
                break
            outcome, when = last["state"], f"on {last['time']}"
            matches, errors = len(last["details"].get("matches", [])), len(last["details"].get("errors", []))
        if outcome == "clean":
            search.clean = point
            break
        reason = (
            f"YARA: {matches} files match (scanned {when})"
            if outcome == "match"
            else f"scan incomplete: {errors} files unreadable (scanned {when})"
        )
        search.passed_over.append({"restore_point": point.id, "reason": reason})
        log(f"{point.id}: {reason}")
    return search
