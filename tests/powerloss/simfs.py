"""A power-loss simulator: a FUSE file system that knows what a power cut would keep.

In the spirit of CrashMonkey (Mohan et al., OSDI 2018): every operation changes the state that
programs see at once (the volatile state, in memory), but only what was explicitly persisted
survives a power cut, with the weakest guarantees POSIX and Linux file systems give:

* a file's contents (and mode, times) are durable as of its last `fsync`/`fdatasync`; a file
  that was never fsynced survives (if its name does) empty;
* a directory's entries (creates, renames in or out, unlinks, mkdir/rmdir) are durable as of
  the last `fsync` of that directory: a renamed file whose destination directory was not
  fsynced is, after the cut, back under its old name (if that directory was fsynced before);
* nothing else persists: no `sync()` (FUSE does not see it), no ordering luck, no journal.

One recording gives every crash state: the durable state after persistence point k depends only
on operations before k, so the file system snapshots it at every fsync (`snapshots[k]`), and a
crash "at k" is `materialize(snapshots[k], directory)`. `mark(label)` records where the test
driver was (between commands) so a check knows which commands had returned before the cut.

The tree starts from a seed directory, all durable (a repository made by `init` on a real disk).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field

from surepoint.mount.fusefs import load_mfusepy


@dataclass(eq=False)
class Node:
    is_dir: bool
    mode: int
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, Node] = field(default_factory=dict)
    mtime_ns: int = 0
    durable_data: bytes | None = None  # file contents at the last fsync
    durable_entries: dict[str, Node] = field(default_factory=dict)  # directory entries at the last fsync
    durable_mode: int = 0
    durable_mtime_ns: int = 0

    def persist(self) -> None:
        if self.is_dir:
            self.durable_entries = dict(self.entries)
        else:
            self.durable_data = bytes(self.data)
        self.durable_mode, self.durable_mtime_ns = self.mode, self.mtime_ns


# A durable state: relative path -> None for a directory, (bytes, mode, mtime_ns) for a file.
Snapshot = dict[str, tuple[bytes, int, int] | None]


def load_seed(directory: str) -> Node:
    """The tree under `directory`, every part of it durable."""

    def load(path: str) -> Node:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            node = Node(True, stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
            for name in os.listdir(path):
                node.entries[name] = load(os.path.join(path, name))
        else:
            with open(path, "rb") as f:
                node = Node(False, stat.S_IMODE(st.st_mode), bytearray(f.read()), mtime_ns=st.st_mtime_ns)
        node.persist()
        return node

    return load(directory)


def durable_snapshot(root: Node) -> Snapshot:
    out: Snapshot = {}

    def walk(node: Node, prefix: str) -> None:
        for name, child in node.durable_entries.items():
            path = f"{prefix}{name}"
            if child.is_dir:
                out[path] = None
                walk(child, path + "/")
            else:
                out[path] = (child.durable_data or b"", child.durable_mode, child.durable_mtime_ns)

    walk(root, "")
    return out


def materialize(snapshot: Snapshot, directory: str) -> None:
    """Write a durable state to a real directory: what a machine finds after the power comes back."""
    os.makedirs(directory, exist_ok=True)
    for path in sorted(p for p, v in snapshot.items() if v is None):
        os.makedirs(os.path.join(directory, path), exist_ok=True)
    for path, value in snapshot.items():
        if value is not None:
            data, mode, mtime_ns = value
            full = os.path.join(directory, path)
            with open(full, "wb") as f:
                f.write(data)
            os.chmod(full, mode)
            os.utime(full, ns=(mtime_ns, mtime_ns))


@dataclass
class Mark:
    label: str
    persist_points: int  # snapshots taken before the mark


class PowerLossFs:
    """The FUSE operations (mfusepy, path based, one thread) over the in-memory model."""

    use_ns = True

    def __init__(self, seed: str) -> None:
        self.root = load_seed(seed)
        self.snapshots: list[Snapshot] = [durable_snapshot(self.root)]  # [0]: before anything
        self.marks: list[Mark] = []
        self.persist_ops: list[str] = ["start"]
        self._handles: dict[int, Node] = {}
        self._next_fh = 1
        self._lock = threading.Lock()

    # the model --------------------------------------------------------------------------------

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir or part not in node.entries:
                raise self._err(errno.ENOENT)
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if not parent.is_dir:
            raise self._err(errno.ENOTDIR)
        return parent, name

    @staticmethod
    def _err(code: int) -> Exception:
        fuse = load_mfusepy()
        return fuse.FuseOSError(code)

    def _persisted(self, what: str) -> None:
        self.snapshots.append(durable_snapshot(self.root))
        self.persist_ops.append(what)

    def mark(self, label: str) -> None:
        with self._lock:
            self.marks.append(Mark(label, len(self.snapshots)))

    def _fh(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        return fh

    # FUSE operations --------------------------------------------------------------------------

    def getattr(self, path: str, fh=None) -> dict:
        with self._lock:
            node = self._handles.get(fh) if fh else None
            node = node or self._lookup(path)
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            return {
                "st_mode": kind | node.mode,
                "st_nlink": 2 if node.is_dir else 1,
                "st_size": len(node.data),
                "st_mtime": node.mtime_ns,
                "st_ctime": node.mtime_ns,
                "st_atime": node.mtime_ns,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
            }

    def readdir(self, path: str, fh) -> list[str]:
        with self._lock:
            return [".", "..", *self._lookup(path).entries]

    def opendir(self, path: str) -> int:
        with self._lock:
            node = self._lookup(path)
            if not node.is_dir:
                raise self._err(errno.ENOTDIR)
            return self._fh(node)

    def releasedir(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._lock:
            node = self._handles.get(fh) or self._lookup(path)
            node.persist()
            self._persisted(f"fsyncdir {path}")
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise self._err(errno.EEXIST)
            parent.entries[name] = Node(True, mode & 0o7777, mtime_ns=time.time_ns())
        return 0

    def rmdir(self, path: str) -> int:
        with self._lock:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise self._err(errno.ENOENT)
            if not node.is_dir:
                raise self._err(errno.ENOTDIR)
            if node.entries:
                raise self._err(errno.ENOTEMPTY)
            del parent.entries[name]
        return 0

    def create(self, path: str, mode: int, fi=None) -> int:
        with self._lock:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                node = Node(False, mode & 0o7777, mtime_ns=time.time_ns())
                parent.entries[name] = node
            else:
                node.data = bytearray()
            return self._fh(node)

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            node = self._lookup(path)
            if flags & os.O_TRUNC:
                node.data = bytearray()
            return self._fh(node)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            node = self._handles.get(fh) or self._lookup(path)
            return bytes(node.data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            node = self._handles.get(fh) or self._lookup(path)
            if len(node.data) < offset:
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            node.mtime_ns = time.time_ns()
            return len(data)

    def truncate(self, path: str, length: int, fh=None) -> int:
        with self._lock:
            node = (self._handles.get(fh) if fh else None) or self._lookup(path)
            if length < len(node.data):
                del node.data[length:]
            else:
                node.data.extend(bytes(length - len(node.data)))
            node.mtime_ns = time.time_ns()
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._lock:
            node = self._handles.get(fh) or self._lookup(path)
            node.persist()
            self._persisted(f"fsync {path}")
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    def unlink(self, path: str) -> int:
        with self._lock:
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise self._err(errno.ENOENT)
            if parent.entries[name].is_dir:
                raise self._err(errno.EISDIR)
            del parent.entries[name]
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._lock:
            old_parent, old_name = self._parent(old)
            new_parent, new_name = self._parent(new)
            node = old_parent.entries.get(old_name)
            if node is None:
                raise self._err(errno.ENOENT)
            target = new_parent.entries.get(new_name)
            if target is not None and target.is_dir and (not node.is_dir or target.entries):
                raise self._err(errno.EISDIR if not node.is_dir else errno.ENOTEMPTY)
            del old_parent.entries[old_name]
            new_parent.entries[new_name] = node
        return 0

    def utimens(self, path: str, times=None) -> int:
        with self._lock:
            node = self._lookup(path)
            node.mtime_ns = times[1] if times else time.time_ns()
        return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._lock:
            self._lookup(path).mode = mode & 0o7777
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        with self._lock:
            self._lookup(path)
        return 0

    def statfs(self, path: str) -> dict:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": 1 << 24,
            "f_bfree": 1 << 23,
            "f_bavail": 1 << 23,
            "f_files": 1 << 20,
            "f_ffree": 1 << 19,
            "f_namemax": 255,
        }


class Recording:
    """The simulator mounted at `mountpoint` (served by a thread of this process) while a workload runs."""

    def __init__(self, seed: str, mountpoint: str) -> None:
        self.fs = PowerLossFs(seed)
        self.mountpoint = mountpoint
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Recording:
        fuse = load_mfusepy()

        def serve() -> None:
            fuse.FUSE(
                self.fs,
                self.mountpoint,
                foreground=True,
                nothreads=True,
                fsname="powerloss",
                default_permissions=True,
                attr_timeout=0,
                entry_timeout=0,
                negative_timeout=0,
                hard_remove=True,
            )

        self._thread = threading.Thread(target=serve, name="powerloss-fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mountpoint):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the power-loss file system did not mount")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["fusermount3", "-u", self.mountpoint], check=False, capture_output=True)
        if self._thread:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                subprocess.run(["fusermount3", "-uz", self.mountpoint], check=False, capture_output=True)
                self._thread.join(timeout=10)

    def mark(self, label: str) -> None:
        self.fs.mark(label)
