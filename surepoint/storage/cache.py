"""A local cache of a remote repository's write-once metadata (restore-point manifests, indexes).

Manifests and indexes never change once written, so a copy on local disk saves downloading them
again for every `list`, `show` and restore plan. The cache lives under
`$SUREPOINT_CACHE_DIR` (or `$XDG_CACHE_HOME/surepoint`, or `~/.cache/surepoint`), one directory
per repository id, mode 0700. It holds the objects exactly as stored (sealed: encrypted where
the repository is), and the repository still authenticates what it reads, so a damaged cache
entry costs a failed check, never wrong data; an entry is removed when its object is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

CACHED_PREFIXES = ("restorepoints/", "indexes/")


def cache_root() -> Path:
    explicit = os.environ.get("SUREPOINT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "surepoint"


def cacheable(name: str) -> bool:
    return name.startswith(CACHED_PREFIXES)


class MetadataCache:
    """Files named after the objects they copy, under one directory per repository."""

    def __init__(self, repository_id: str, root: Path | None = None) -> None:
        if not repository_id or not all(c in "0123456789abcdef" for c in repository_id):
            raise ValueError("a repository id is hexadecimal")
        self.directory = (root or cache_root()) / repository_id
        self._lock = threading.Lock()
        self._ready = False

    def _path(self, name: str) -> Path:
        # Object names are repository paths; a digest keeps the file name flat and safe.
        return self.directory / hashlib.sha256(name.encode()).hexdigest()

    def _prepare(self) -> bool:
        with self._lock:
            if not self._ready:
                try:
                    self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self.directory.mkdir(mode=0o700, exist_ok=True)
                    os.chmod(self.directory, 0o700)
                except OSError:
                    return False  # an unusable cache only costs downloads
                self._ready = True
        return True

    def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except OSError:
            return None

    def put(self, name: str, data: bytes) -> None:
        if not self._prepare():
            return
        path = self._path(name)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def discard(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._path(name).unlink()
