"""Known repositories: what this machine has seen of each repository, to refuse a downgrade.

The repository's config is plain JSON on storage that an attacker may be able to write. An
encrypted repository's config carries a MAC (repo/crypto.py) that only a passphrase holder can
make, but a MAC proves nothing about a config that has none, or about a key record that does not
open: the client's memory closes those gaps. The first time a client opens a repository it notes
here its id, location, encryption, whether its config has a MAC, and a fingerprint of its key
record; from then on it refuses, as tampering (DamagedData, exit 3):

* a config for that id that says "none" (or another cipher): the downgrade to plain text;
* a config without a MAC for an id whose config had one: the MAC stripped to allow edits;
* a config with another id at a location where an encrypted repository was: a forged config;

and it tells a wrong passphrase from a key record that was replaced (the record differs from the
one this machine saw and does not open with the passphrase).

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


class ConfigTampered(DamagedData):
    """A repository config was changed by someone without the key (MAC wrong or removed, id swapped)."""


def known_repositories_path() -> str:
    explicit = os.environ.get("SUREPOINT_KNOWN_REPOSITORIES")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "surepoint", "known-repositories.json")


class KnownRepositories:
    """This machine's memory of the repositories it opened (see the module docstring)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or known_repositories_path()

    def _hint(self) -> str:
        return f"if the repository was really re-created, remove its entry from {self.path}"

    def check(self, config: dict, location: str) -> None:
        """Refuse a config that contradicts what this machine saw (before any key is used)."""
        known = _load(self.path)
        repo_id = config.get("id")
        if not isinstance(repo_id, str):
            return  # no identity to compare: the schema check reports it
        record = config.get("encryption")
        encryption = record.get("cipher") if isinstance(record, dict) else "none" if record is None else None
        if not isinstance(encryption, str):
            return  # a malformed encryption record: the schema check reports it
        seen = known.get(repo_id)
        if isinstance(seen, dict):
            if seen.get("encryption") not in (None, encryption):
                raise EncryptionDowngrade(
                    f"repository config at {location} says encryption {encryption}, but repository {repo_id} was "
                    f"{seen['encryption']}-encrypted when this machine last opened it: refusing it (the config may "
                    f"have been tampered with; {self._hint()})"
                )
            if seen.get("mac") and "mac" not in config:
                raise ConfigTampered(
                    f"repository config at {location} has lost its MAC (repository {repo_id} had one when this "
                    "machine last opened it): refusing it, it may have been tampered with"
                )
        for other_id, other in known.items():
            if (
                other_id != repo_id
                and isinstance(other, dict)
                and other.get("location") == location
                and other.get("encryption") not in (None, "none")
            ):
                raise ConfigTampered(
                    f"repository config at {location} names repository {repo_id[:64]!r}, but this machine "
                    f"knows {location} as encrypted repository {other_id}: refusing it (a forged config?; "
                    f"{self._hint()})"
                )

    def knows_location(self, location: str) -> bool:
        return any(isinstance(e, dict) and e.get("location") == location for e in _load(self.path).values())

    def key_record_changed(self, repo_id: str, fingerprint: str) -> bool:
        """Does this machine remember another key record for this repository id?"""
        seen = _load(self.path).get(repo_id)
        return isinstance(seen, dict) and seen.get("key_record") not in (None, fingerprint)

    def remember(self, repo_id: str, *, encryption: str, location: str, mac: bool, key_record: str) -> None:
        """Note what a successful open found (a MAC, once seen, is required from then on)."""
        with contextlib.suppress(OSError):  # no writable home (a job run as another user): remember nothing
            self._update(repo_id, encryption=encryption, location=location, mac=mac, key_record=key_record)

    def _update(self, repo_id: str, *, encryption: str, location: str, mac: bool, key_record: str) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = _load(self.path)
            seen = known.get(repo_id) if isinstance(known.get(repo_id), dict) else {}
            entry = {
                "encryption": encryption,
                "location": location,
                "mac": bool(mac or seen.get("mac")),
                "key_record": key_record,
            }
            if seen == entry:
                return
            known[repo_id] = entry
            tmp = f"{self.path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)


def _load(path: str) -> dict:
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        data = json.load(f)
        if isinstance(data, dict):
            return data
    return {}
