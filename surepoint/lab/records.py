"""The lab's record of what it has made, so that a lab that died can be cleaned up by the next one.

Each running lab has a directory LAB_DIR/<lab id>/ with lab.json: the owner process (pid and
start time), its network namespace and the workdirs of its VMs (each an instant-recovery session
with its own instant.json). The record is written before anything is made and updated as VMs
start. `clean_leftovers` removes every lab whose owner is gone: it stops the VMs, drops their
overlays, unmounts the repository and deletes the namespace; a namespace of ours that no record
names and in which nothing runs is deleted too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from surepoint.errors import SurepointError
from surepoint.processes import process_start
from surepoint.statefile import write_json_atomically

DEFAULT_LAB_DIR = "/var/lib/surepoint/lab"
STATE_FILE = "lab.json"


def lab_dir() -> str:
    return os.environ.get("SUREPOINT_LAB_DIR", DEFAULT_LAB_DIR)


def new_lab_id() -> str:
    return time.strftime("%m%d%H%M") + secrets.token_hex(2)


@dataclass
class LabState:
    lab_id: str
    namespace: str
    pid: int = field(default_factory=os.getpid)
    pid_start: int | None = None
    started: float = field(default_factory=time.time)
    deadline: float = 0.0  # wall-clock time after which the lab tears itself down
    vm_workdirs: list[str] = field(default_factory=list)
    status: str = "starting"  # starting, running, open, tearing-down
    door: str = ""  # an open lab (`lab open`): "127.0.0.1:PORT -> ADDRESS:PORT"; its owner is the door process
    points: list[str] = field(default_factory=list)  # an open lab: the restore points running in it

    def __post_init__(self) -> None:
        if self.pid_start is None:
            self.pid_start = process_start(self.pid)

    @property
    def directory(self) -> str:
        return os.path.join(lab_dir(), self.lab_id)

    def save(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        write_json_atomically(os.path.join(self.directory, STATE_FILE), asdict(self))

    def owner_alive(self) -> bool:
        return process_start(self.pid) == self.pid_start

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def load_labs() -> list[LabState]:
    labs = []
    try:
        names = sorted(os.listdir(lab_dir()))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(lab_dir(), name, STATE_FILE)
        try:
            with open(path) as f:
                raw = json.load(f)
            labs.append(LabState(**{k: v for k, v in raw.items() if k in LabState.__dataclass_fields__}))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError) as exc:
            raise SurepointError(f"cannot read lab record {path}: {exc}") from None
    return labs


def teardown_lab(state: LabState, say: Callable[[str], None]) -> list[str]:
    """Stop every VM of the lab, drop overlays and mounts, delete the namespace; what could not be removed."""
    from surepoint.lab.network import LabNetwork
    from surepoint.mount.instant import InstantSession, discard_instant

    problems = []
    for workdir in reversed(state.vm_workdirs):
        if InstantSession.load(workdir) is None:
            continue
        try:
            discard_instant(workdir, log=say)
        except SurepointError as exc:
            problems.append(f"{workdir}: {exc}")
    try:
        LabNetwork.destroy_namespace(state.namespace)
    except SurepointError as exc:
        problems.append(f"namespace {state.namespace}: {exc}")
    if not problems:
        state.remove()
    return problems


def clean_leftovers(say: Callable[[str], None]) -> list[str]:
    """Remove what labs whose process is gone left behind; the lab ids cleaned."""
    from surepoint.lab.network import LabNetwork, list_lab_namespaces

    cleaned = []
    live_namespaces = set()
    for state in load_labs():
        if state.owner_alive():
            live_namespaces.add(state.namespace)
            continue
        say(f"lab {state.lab_id} (pid {state.pid}) is gone: removing its VMs, overlays, mounts and namespace")
        problems = teardown_lab(state, say)
        if problems:
            live_namespaces.add(state.namespace)
            say(f"lab {state.lab_id}: could not remove everything: {'; '.join(problems)}")
        else:
            cleaned.append(state.lab_id)
    for namespace in list_lab_namespaces():
        if namespace in live_namespaces:
            continue
        if _processes_in(namespace):  # a lab with a record elsewhere (another SUREPOINT_LAB_DIR)
            say(f"namespace {namespace} has no lab record here but processes still run in it: left alone")
            continue
        say(f"namespace {namespace} belongs to no running lab: deleting it")
        with contextlib.suppress(SurepointError):
            LabNetwork.destroy_namespace(namespace)
    return cleaned


def _processes_in(namespace: str) -> bool:
    proc = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())
