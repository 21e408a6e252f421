"""Known repositories: what this machine has seen of each repository id, to refuse a downgrade.

The repository's config is plain JSON on storage that an attacker may be able to write. Client
side encryption is meant for exactly that attacker, so the config's word on encryption is not
enough: the first time a client opens a repository it notes its id and cipher here, and from then
on a config that says "none" (or another cipher) for that id is refused as tampering.

One JSON file, `~/.config/surepoint/known-repositories.json` (or $SUREPOINT_KNOWN_REPOSITORIES),
0600 in a 0700 directory, updated under a lock and replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from surepoint.errors import DamagedData


class EncryptionDowngrade(DamagedData):
    """The config of a repository this machine knows as encrypted says otherwise."""


def known_repositories_path() -> str:
    explicit = os.environ.get("SUREPOINT_KNOWN_REPOSITORIES")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "surepoint", "known-repositories.json")


def check_and_remember(repository_id: str, encryption: str, location: str, path: str | None = None) -> None:
    """Refuse a repository whose encryption is not what this machine saw before; remember a new one."""
    path = path or known_repositories_path()
    try:
        _check_and_remember(repository_id, encryption, location, path)
    except OSError:
        # No writable home (a job run as another user): what was remembered is still checked
        # when it can be read, and nothing new is remembered.
        seen = _load(path).get(repository_id)
        if isinstance(seen, dict) and seen.get("encryption") not in (None, encryption):
            raise _downgrade(repository_id, location, seen["encryption"], encryption, path) from None


def _downgrade(repository_id: str, location: str, was: str, now: str, path: str) -> EncryptionDowngrade:
    return EncryptionDowngrade(
        f"repository {repository_id} at {location} was {was}-encrypted when this machine last opened it, "
        f"and its config now says {now}: refusing it (the config may have been tampered with; if the "
        f"repository was really re-created, remove its entry from {path})"
    )


def _check_and_remember(repository_id: str, encryption: str, location: str, path: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _load(path)
        seen = known.get(repository_id)
        if isinstance(seen, dict) and seen.get("encryption") not in (None, encryption):
            raise _downgrade(repository_id, location, seen["encryption"], encryption, path)
        if seen is None:
            known[repository_id] = {"encryption": encryption, "location": location}
            tmp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)


def _load(path: str) -> dict:
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        data = json.load(f)
        if isinstance(data, dict):
            return data
    return {}
