"""Mount state on this host: /run/surepoint/mounts/<id>.json (and <id>.log), and tearing mounts down.

A state file is written before anything is mounted and updated after every loop device and
filesystem, so whatever a crashed `surepoint mount` (or a killed FUSE process) left behind is
named in it: the next mount or umount command finds state whose FUSE process is gone and cleans
it (lazy unmount of the tree, detach of the loop devices that still point at our image).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field

from surepoint.errors import InUse, SurepointError
from surepoint.processes import process_alive, process_start
from surepoint.statefile import write_json_atomically

DEFAULT_STATE_DIR = "/run/surepoint/mounts"


def state_dir() -> str:
    return os.environ.get("SUREPOINT_MOUNT_STATE_DIR", DEFAULT_STATE_DIR)


@dataclass
class MountState:
    id: str
    dir: str
    repository: str  # repository id
    location: str  # repository location
    restore_point: str
    name: str
    pid: int | None = None  # the FUSE server
    pid_start: int | None = None  # its start time (clock ticks after boot): tells a reused pid apart
    owner: int | None = None  # the command that set the mount up
    status: str = "starting"  # starting, mounted
    created: float = field(default_factory=time.time)
    disks: list[dict] = field(default_factory=list)  # {"number", "name", "size", "image"}
    loops: list[dict] = field(default_factory=list)  # {"device", "image", "offset", "size"}
    mounts: list[dict] = field(default_factory=list)  # {"path", "device", "fstype", "disk", "volume", "options"}
    skipped: list[dict] = field(default_factory=list)  # volumes not mounted, with the reason
    guest: dict = field(default_factory=dict)  # {"layout": the guest's fstab mapped, "binds": [DIR/guest...]}

    @property
    def path(self) -> str:
        return os.path.join(state_dir(), f"{self.id}.json")

    @property
    def log_path(self) -> str:
        return os.path.join(state_dir(), f"{self.id}.log")

    def save(self) -> None:
        os.makedirs(state_dir(), mode=0o700, exist_ok=True)
        write_json_atomically(self.path, self.__dict__)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def alive(self) -> bool:
        return self.pid is not None and process_alive(self.pid) and process_start(self.pid) == self.pid_start

    def to_json(self) -> dict:
        return dict(self.__dict__, alive=self.alive(), state_file=self.path, log=self.log_path)


def load_states() -> list[MountState]:
    states = []
    try:
        names = sorted(os.listdir(state_dir()))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(state_dir(), name)) as f:
                raw = json.load(f)
            states.append(MountState(**raw))
        except (OSError, ValueError, TypeError):
            continue
    return states


def find_state(directory: str) -> MountState | None:
    real = os.path.realpath(directory)
    for state in load_states():
        if state.dir == real:
            return state
    return None


# -- the system -------------------------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SurepointError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SurepointError(f"{' '.join(argv)} did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise SurepointError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _unescape_mountinfo(text: str) -> str:
    return text.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mount_table() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount in our namespace, in mount order."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                rows.append((_unescape_mountinfo(fields[4]), rfields[0], _unescape_mountinfo(rfields[1])))
    return rows


def is_mountpoint(path: str) -> bool:
    return any(m == path for m, _, _ in mount_table())


LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32s2Q")


def loop_status(device: str) -> tuple[int, int, int] | None:
    """(backing device, backing inode, offset) of an attached loop device; None when it is free."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:
        return None  # ENXIO: not attached
    finally:
        os.close(fd)
    lo_device, lo_inode, _rdevice, lo_offset = LOOP_INFO64.unpack(buf)[:4]
    return lo_device, lo_inode, lo_offset


def detach_loop(loop: dict) -> bool:
    """Detach a loop device of ours, never one that serves something else by now. True if it is gone."""
    device = loop["device"]
    status = loop_status(device)
    if status is None:
        return True
    if status != (loop.get("dev"), loop.get("ino"), loop["offset"]):
        return True  # reused by someone else since: not ours any more
    # A device still in use (a lazily unmounted filesystem) is set to detach itself when released.
    run(["losetup", "-d", device], check=False)
    return loop_status(device) is None


def _fuse_mounted(state: MountState) -> bool:
    return any(m == state.dir and t.startswith("fuse") for m, t, _ in mount_table())


def teardown(state: MountState, *, lazy: bool, log=None) -> None:
    """Unmount the filesystems, detach the loops, unmount FUSE, stop the server, forget the state.

    lazy=False fails (leaving the state consistent) when a filesystem is busy; lazy=True (and any
    crashed mount) detaches the whole tree at once and lets the kernel finish when it is released.
    """
    say = log or (lambda m: None)
    dead = not state.alive()
    if dead or lazy:
        lazy = True
        # Lazily, deepest first; the paths are not canonicalised (a dead FUSE server answers no lookup).
        for path, _type, _src in reversed(mount_table()):
            if path.startswith(state.dir + "/"):
                run(["umount", "-l", "-c", path], check=False)
        state.mounts.clear()
    else:
        for path in reversed(list(state.guest.get("binds", []))):
            if is_mountpoint(path):
                proc = run(["umount", "-c", path], check=False)
                if proc.returncode != 0 and is_mountpoint(path):
                    state.save()
                    raise InUse(f"cannot unmount {path}: {proc.stderr.strip() or 'busy'}; close the files open there")
            state.guest["binds"].remove(path)
        for entry in reversed(list(state.mounts)):
            path = entry["path"]
            if is_mountpoint(path):
                proc = run(["umount", "-c", path], check=False)
                if proc.returncode != 0 and is_mountpoint(path):
                    state.save()
                    raise InUse(
                        f"cannot unmount {path}: {proc.stderr.strip() or 'busy'}; close the files open there "
                        "(see `fuser -vm PATH`)"
                    )
            state.mounts.remove(entry)
            say(f"unmounted {path}")
    for loop in reversed(list(state.loops)):
        if detach_loop(loop):
            state.loops.remove(loop)
    if _fuse_mounted(state):
        proc = run(["fusermount3", "-u", state.dir], check=False)
        if proc.returncode != 0 and _fuse_mounted(state):
            if not lazy:
                state.save()
                raise InUse(f"cannot unmount {state.dir}: {proc.stderr.strip()}")
            run(["umount", "-l", "-c", state.dir], check=False)
    if state.pid is not None and not dead and not state.loops:
        _wait_for_exit(state)
    if state.loops:
        # Loops still attached (busy filesystem, lazily unmounted): they detach themselves when released,
        # and the FUSE server, which still serves them, exits after that.
        say("loop devices " + ", ".join(loop["device"] for loop in state.loops) + " detach when released")
    state.remove()
    _remove_log_if_clean(state)


def _wait_for_exit(state: MountState, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(state.pid, os.WNOHANG)  # type: ignore[arg-type] # reap it when it is our child
        if not state.alive():
            return
        time.sleep(0.05)
    if state.pid is not None and state.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)


def _remove_log_if_clean(state: MountState) -> None:
    """Keep the log of a mount that logged errors (or crashed) for a look afterwards; drop the rest."""
    try:
        with open(state.log_path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return
    if "ERROR" not in text and "CRITICAL" not in text:
        with contextlib.suppress(OSError):
            os.unlink(state.log_path)


def clean_stale(log=None) -> list[MountState]:
    """Tear down every mount whose FUSE server is gone (crashed or killed). Returns what was cleaned."""
    cleaned = []
    for state in load_states():
        if state.alive():
            continue
        if state.status == "starting" and state.owner is not None and process_alive(state.owner):
            continue  # a mount still being set up by another command
        teardown(state, lazy=True, log=log)
        cleaned.append(state)
    return cleaned
