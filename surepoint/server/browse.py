"""Browsing a restore point's files from the console: the restore point is mounted with
`surepoint mount` (read-only, FUSE), directories are listed inside the guest filesystem the way
`restore-files` resolves them, and a download is a `surepoint restore-files` of that one file
into a private temporary directory. Mounts idle for a while, and all at stop, are taken down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

from surepoint.errors import SurepointError, UsageError
from surepoint.mount.files import normalize_request, resolve_source
from surepoint.server.config import ServerConfig

IDLE_SECONDS = 600
MAX_ENTRIES = 5000


class BrowseError(SurepointError):
    """A restore point cannot be browsed (not mountable, no filesystem, path not there)."""


class Browser:
    def __init__(self, config: ServerConfig, env_for) -> None:
        self.config = config
        self.env_for = env_for  # repository name -> environment of a child `surepoint` process
        self._mounts: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()
        self.base = os.path.join(config.state_dir, "browse")

    def _cli(self, repository: str, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "surepoint.server.child", *argv],
            env=self.env_for(repository),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    @staticmethod
    def _error(proc: subprocess.CompletedProcess) -> str:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        return (lines[-1][len("error:") :].strip() if lines else proc.stderr.strip()[-300:]) or "failed"

    def mount(self, repository: str, point_id: str) -> dict:
        """The mount state of the restore point (mounted now if it is not yet)."""
        key = (repository, point_id)
        with self._lock:
            entry = self._mounts.get(key)
            if entry is not None and os.path.ismount(entry["dir"]):
                entry["used"] = time.monotonic()
                return entry
            os.makedirs(self.base, mode=0o700, exist_ok=True)
            directory = tempfile.mkdtemp(prefix=f"{point_id[:16]}-", dir=self.base)
            proc = self._cli(repository, ["mount", point_id, directory, "--json"])
            if proc.returncode != 0:
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
                raise BrowseError(f"cannot mount restore point {point_id}: {self._error(proc)}")
            state = json.loads(proc.stdout)
            entry = {"dir": directory, "state": state, "used": time.monotonic()}
            self._mounts[key] = entry
            return entry

    def volumes(self, repository: str, point_id: str) -> list[dict]:
        state = self.mount(repository, point_id)["state"]
        return [
            {"index": i, "disk": m["disk"], "volume": m["volume"], "fstype": m["fstype"]}
            for i, m in enumerate(state.get("mounts", []))
        ]

    def _volume(self, repository: str, point_id: str, index: int) -> dict:
        mounts = self.mount(repository, point_id)["state"].get("mounts", [])
        if not mounts:
            raise BrowseError(f"restore point {point_id} has no filesystem that could be mounted")
        if not 0 <= index < len(mounts):
            raise UsageError(f"volume {index} does not exist (the restore point has {len(mounts)})")
        return mounts[index]

    def list_dir(self, repository: str, point_id: str, index: int, path: str) -> list[dict]:
        """Entries of directory `path` of volume `index`: name, type, size, mode, mtime."""
        volume = self._volume(repository, point_id, index)
        root = volume["path"]
        try:
            resolved = resolve_source(root, normalize_request(path) + ["."])
            full = os.path.join(root, *resolved)
            if not stat.S_ISDIR(os.lstat(full).st_mode):
                raise BrowseError(f"{path} is not a directory")
            entries = []
            with os.scandir(full) as it:
                for item in it:
                    if len(entries) >= MAX_ENTRIES:
                        break
                    st = item.stat(follow_symlinks=False)
                    kind = (
                        "dir"
                        if stat.S_ISDIR(st.st_mode)
                        else "file"
                        if stat.S_ISREG(st.st_mode)
                        else ("link" if stat.S_ISLNK(st.st_mode) else "other")
                    )
                    entries.append(
                        {
                            "name": item.name,
                            "type": kind,
                            "size": st.st_size if kind == "file" else 0,
                            "mode": stat.filemode(st.st_mode),
                            "mtime": int(st.st_mtime),
                            "target": _readlink(item.path) if kind == "link" else None,
                        }
                    )
        except OSError as exc:
            raise BrowseError(f"{path}: {exc.strerror or exc}") from None
        entries.sort(key=lambda e: (e["type"] != "dir", e["name"]))
        return entries

    def download(self, repository: str, point_id: str, index: int, path: str) -> tuple[str, str, str]:
        """Copy one regular file out with `restore-files`: (file path, its name, the directory to remove)."""
        parts = normalize_request(path)
        if not parts:
            raise UsageError("give the path of a file")
        volume = self._volume(repository, point_id, index)
        target = tempfile.mkdtemp(prefix="download-", dir=self.base)
        argv = ["restore-files", point_id, "/" + "/".join(parts), "--to", target, "--json"]
        argv += ["--disk", str(volume["disk"]), "--partition", volume["volume"].removeprefix("part")]
        proc = self._cli(repository, argv)
        if proc.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise BrowseError(f"cannot restore {path}: {self._error(proc)}")
        result = os.path.join(target, *parts)
        if not stat.S_ISREG(os.lstat(result).st_mode):
            shutil.rmtree(target, ignore_errors=True)
            raise BrowseError(f"{path} is not a regular file (restore directories with a restore session)")
        return result, parts[-1], target

    def unmount_idle(self, idle: float = IDLE_SECONDS) -> None:
        now = time.monotonic()
        with self._lock:
            keys = [k for k, e in self._mounts.items() if now - e["used"] > idle]
        for key in keys:
            self._unmount(key)

    def unmount_all(self) -> None:
        with self._lock:
            keys = list(self._mounts)
        for key in keys:
            self._unmount(key)

    def _unmount(self, key: tuple[str, str]) -> None:
        with self._lock:
            entry = self._mounts.pop(key, None)
        if entry is None:
            return
        proc = self._cli(key[0], ["umount", entry["dir"]])
        if proc.returncode != 0:
            self._cli(key[0], ["umount", entry["dir"], "--lazy"])
        with contextlib.suppress(OSError):
            os.rmdir(entry["dir"])


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"
