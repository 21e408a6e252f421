"""The power-loss matrix: record backup, forget, gc and passwd on the simulator, then cut the power everywhere.

`record(work)` runs the workload once through the real `surepoint` command on a repository that
lives on the simulator (tests/powerloss/simfs.py) and returns the recording. `check(...)` takes
one crash state (the durable state after persistence point k), writes it to a directory as the
machine would find it after the power comes back, and asserts what a user relies on:

* every restore point whose `backup` had returned before the cut is listed, unless a `forget`
  that had returned removed it;
* every listed restore point restores bit-exactly (the image as it was when it was backed up);
* `verify` is clean (exit 0) and no manifest is damaged;
* the repository opens with the new passphrase once `passwd` has returned, and with the old
  or the new one while it ran.

`crash_points(recording, count)` picks the states a run checks: evenly spread over the whole
recording, plus the last state before and the first after every command boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import SUREPOINT
from tests.powerloss.simfs import Recording, materialize

OLD_PASS = "old horse battery"
NEW_PASS = "new horse battery"
CHUNK = 64 << 10
IMAGE = 1 << 20


@dataclass
class Backup:
    label: str
    name: str
    sha256: str
    point: str | None = None  # known once the command returned


@dataclass
class Workload:
    recording: Recording
    backups: list[Backup] = field(default_factory=list)
    forgotten: dict[str, str] = field(default_factory=dict)  # point id -> the forget's mark label
    durations: dict[str, float] = field(default_factory=dict)

    def mark_index(self, label: str) -> int:
        """The snapshot that is the durable state when the command before this mark returned."""
        return next(m.persist_points for m in self.recording.fs.marks if m.label == label) - 1


def _env(repo: str, catalog: str, passphrase: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUREPOINT_")}
    env.update(SUREPOINT_REPO=repo, SUREPOINT_CATALOG=catalog, SUREPOINT_PASSPHRASE=passphrase)
    env["SUREPOINT_KNOWN_REPOSITORIES"] = catalog + ".known-repositories.json"
    return env


def _run(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([SUREPOINT, *args], env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"surepoint {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc


def _image(path: Path, seed: int, base: bytes | None = None) -> str:
    """A 1 MiB image (from `base` with a few 64 KiB regions rewritten); returns its sha256."""
    rng = random.Random(seed)
    data = bytearray(base if base is not None else rng.randbytes(IMAGE))
    for _ in range(4 if base is not None else 0):
        at = rng.randrange(0, IMAGE // CHUNK) * CHUNK
        data[at : at + CHUNK] = rng.randbytes(CHUNK)
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def record(work: Path) -> Workload:
    seed, mnt = work / "seed", work / "mnt"
    mnt.mkdir(parents=True)
    catalog = str(work / "catalog.sqlite")
    _run(_env(str(seed), catalog, OLD_PASS), "init", "--encryption", "aes-256-gcm", "--chunk-size", str(CHUNK))
    web, db = work / "web.img", work / "db.img"
    recording = Recording(str(seed), str(mnt))
    load = Workload(recording)
    with recording:
        env = _env(str(mnt), catalog, OLD_PASS)

        def backup(label: str, image: Path, name: str, sha: str, passphrase_env: dict) -> None:
            entry = Backup(label, name, sha)
            load.backups.append(entry)
            entry.point = json.loads(_run(passphrase_env, "backup", str(image), "--name", name, "--json").stdout)["id"]
            recording.mark(label)

        sha = _image(web, 1)
        backup("backup web 1", web, "web", sha, env)
        sha = _image(web, 2, web.read_bytes())
        backup("backup web 2", web, "web", sha, env)
        backup("backup db 1", db, "db", _image(db, 3), env)
        _run(env, "forget", "--name", "web", "--keep-last", "1")
        load.forgotten[load.backups[0].point] = "forget web"
        recording.mark("forget web")
        _run(env, "gc", "--grace", "0")
        recording.mark("gc")
        _run({**env, "SUREPOINT_NEW_PASSPHRASE": NEW_PASS}, "passwd")
        recording.mark("passwd")
        sha = _image(web, 4, web.read_bytes())
        backup("backup web 3", web, "web", sha, _env(str(mnt), catalog, NEW_PASS))
    return load


def crash_points(load: Workload, count: int | None) -> list[int]:
    """`count` crash states (all of them when None): spread evenly, plus both sides of every command boundary."""
    total = len(load.recording.fs.snapshots)
    if count is None or count >= total:
        return list(range(total))
    chosen = {round(i * (total - 1) / max(1, count - 1)) for i in range(count)}
    for mark in load.recording.fs.marks:
        chosen |= {max(0, mark.persist_points - 2), mark.persist_points - 1}
    return sorted(chosen)


def check(load: Workload, state: int, work: Path, *, through_cli: bool = False) -> list[str]:
    """The problems found after a power cut at `state` (empty: nothing lost, nothing damaged).

    In process (the repository library, one passphrase derivation) by default: about 0.2 s a state;
    through the `surepoint` command (list, restore, verify) with through_cli, several seconds."""
    where = work / f"crash-{state}"
    shutil.rmtree(where, ignore_errors=True)
    materialize(load.recording.fs.snapshots[state], str(where))
    marks = {m.label: load.mark_index(m.label) for m in load.recording.fs.marks}
    returned = {label for label, index in marks.items() if index <= state}
    passphrases = [NEW_PASS] if "passwd" in returned else [OLD_PASS, NEW_PASS]
    try:
        observe = _observe_cli if through_cli else _observe_library
        problems, restored = observe(where, passphrases, work / f"state-{state}")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if problems and restored is None:
        return problems
    by_point = {b.point: b for b in load.backups if b.point}
    for backup in load.backups:
        forgotten_by = load.forgotten.get(backup.point or "")
        if backup.label in returned and backup.point not in restored and forgotten_by not in returned:
            problems.append(f"restore point of `{backup.label}` ({backup.point}) is lost")
    for point, digest in sorted(restored.items()):
        backup = by_point.get(point)
        if backup is None:
            problems.append(f"restore point {point} was never made by the workload")
        elif digest is None:
            pass  # the restore failed: already a problem
        elif digest != backup.sha256:
            problems.append(f"restore of `{backup.label}` gave different bytes")
    return problems


def _observe_library(where: Path, passphrases: list[str], scratch: Path) -> tuple[list[str], dict | None]:
    """(problems, restore point id -> sha256 of its restored image, None when the restore failed)."""
    from surepoint.errors import SurepointError
    from surepoint.repo.repository import Repository
    from surepoint.repo.restore import restore_disk
    from surepoint.repo.verify import verify
    from surepoint.storage.local import LocalBackend

    problems: list[str] = []
    repo = None
    for passphrase in passphrases:
        try:
            repo = Repository.open(LocalBackend(str(where)), lambda p=passphrase: p)
            break
        except SurepointError as exc:
            error = exc
    if repo is None:
        return [f"the repository does not open: {error}"], None
    points = repo.list_restore_points()
    if repo.damaged_manifests:
        problems.append(f"damaged manifests: {repo.damaged_manifests}")
    scratch.mkdir(parents=True, exist_ok=True)
    restored: dict[str, str | None] = {}
    for point in points:
        target = scratch / f"{point.id}.img"
        try:
            restore_disk(repo, point, point.disks[0].number, str(target), workers=2)
            restored[point.id] = hashlib.sha256(target.read_bytes()).hexdigest()
        except SurepointError as exc:
            restored[point.id] = None
            problems.append(f"restore of {point.id} ({point.name}) failed: {exc}")
        target.unlink(missing_ok=True)
    report = verify(repo, points)
    if report.damaged:
        problems.append(f"verify finds damage: {report.damaged_chunks} chunk(s), manifests {report.damaged_manifests}")
    shutil.rmtree(scratch, ignore_errors=True)
    return problems, restored


def _observe_cli(where: Path, passphrases: list[str], scratch: Path) -> tuple[list[str], dict | None]:
    scratch.mkdir(parents=True, exist_ok=True)
    catalog = str(scratch / "catalog.sqlite")
    env = None
    for passphrase in passphrases:
        listed = _run(_env(str(where), catalog, passphrase), "list", "--json", check=False)
        if listed.returncode == 0:
            env = _env(str(where), catalog, passphrase)
            break
    if env is None:
        return [f"the repository does not open: {listed.stderr.strip()}"], None
    problems: list[str] = []
    data = json.loads(listed.stdout)
    if data.get("damaged_manifests"):
        problems.append(f"damaged manifests: {data['damaged_manifests']}")
    restored: dict[str, str | None] = {}
    for point in data["restore_points"]:
        target = scratch / f"{point['id']}.img"
        result = _run(env, "restore", point["id"], "--to", str(target), check=False)
        if result.returncode != 0:
            restored[point["id"]] = None
            problems.append(f"restore of {point['id']} failed ({result.returncode}): {result.stderr.strip()}")
        else:
            restored[point["id"]] = hashlib.sha256(target.read_bytes()).hexdigest()
    verified = _run(env, "verify", check=False)
    if verified.returncode != 0:
        problems.append(f"verify exit {verified.returncode}: {verified.stderr.strip()[-300:]}")
    shutil.rmtree(scratch, ignore_errors=True)
    return problems, restored


def describe(load: Workload, state: int) -> str:
    fs = load.recording.fs
    before = [m.label for m in fs.marks if m.persist_points - 1 <= state]
    return f"state {state}/{len(fs.snapshots) - 1} ({fs.persist_ops[state]}; after: {', '.join(before) or 'nothing'})"
