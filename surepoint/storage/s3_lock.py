"""Immutability for S3 repositories with Object Lock: what is written cannot be deleted or changed.

A repository made with `make_immutable(days)` on a bucket with Object Lock (which implies
versioning) writes every repository object (config, chunks, indexes, manifests) with a
COMPLIANCE retention date `days` (plus a slack) ahead. Nobody, not even the bucket owner or the
repository's own credentials, can delete such a version or shorten its date before it passes.

What an attacker with the repository's credentials can still do is add versions: a DELETE
without a version id adds a delete marker, a PUT adds a new current version. So reading is
version-aware: every repository object is read from its *original* version (the oldest one that
is not a delete marker), which is exactly the one that is locked; later versions and delete
markers are ignored. Objects are write-once in the repository format, so the original version
is the right one (the config too: its keys cannot change in an immutable repository).

Forever-incremental keeps working: when a backup reuses a chunk (`claim`, the backend's
`touch`), its retention is extended to at least `days` from now, so every restore point stays
protected for `days` after it is made, whatever old chunks it shares. Extending by `days` plus
a slack means a chunk is extended once per slack period, not at every backup.

Deleting (forget, gc) removes every version of a key; a version still under retention makes it
raise `ObjectLocked` with the date after which deletion will succeed, and the caller plans the
deletion for then. The lock record (`s3-object-lock.json`, itself locked) says how many days.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from surepoint.errors import InvalidArgument, ObjectLocked, StorageError
from surepoint.storage.backend import ObjectInfo, ObjectNotFound

if TYPE_CHECKING:
    from surepoint.storage.s3 import S3Backend

MARKER = "s3-object-lock.json"
MODE = "COMPLIANCE"
DAY = 86400.0
PROTECTED_NAMES = ("config", MARKER)
PROTECTED_PREFIXES = ("chunks/", "indexes/", "restorepoints/")


class ObjectLockUnavailable(InvalidArgument):
    """Immutability was asked of storage that cannot give it (no Object Lock on the bucket)."""


@dataclass
class Version:
    id: str
    size: int
    modified: float
    retain_until: float | None = None  # unknown until read


def protects(name: str) -> bool:
    """Repository objects that are written once and locked (locks/ and trash/ are neither)."""
    return name in PROTECTED_NAMES or name.startswith(PROTECTED_PREFIXES)


def slack_days(days: int) -> int:
    return max(1, math.ceil(days / 10))


class ObjectLock:
    """The immutability side of one S3Backend."""

    protects = staticmethod(protects)

    def __init__(self, backend: S3Backend, days: int) -> None:
        self.backend = backend
        self.days = days
        self._originals: dict[str, Version] = {}
        self._listed_dirs: set[str] = set()
        self._lock = threading.Lock()

    # setting up ------------------------------------------------------------------------------

    @staticmethod
    def bucket_has_lock(backend: S3Backend) -> bool:
        from botocore.exceptions import ClientError

        try:
            answer = backend._call(
                "read the Object Lock settings of",
                backend.bucket,
                lambda: backend.client.get_object_lock_configuration(Bucket=backend.bucket),
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("ObjectLockConfigurationNotFoundError", "AccessDenied", "NotImplemented", "InvalidRequest"):
                return False
            raise backend._failed(exc, "read the Object Lock settings of", backend.bucket) from None
        return answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    @classmethod
    def detect(cls, backend: S3Backend) -> ObjectLock | None:
        """The repository's immutability, if its bucket has Object Lock and the repository was made immutable."""
        if not cls.bucket_has_lock(backend):
            return None
        probe = cls(backend, 0)
        marker = probe.original(MARKER)
        if marker is None:
            return None
        try:
            days = int(json.loads(backend._get_current(MARKER, marker.id))["days"])
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"{backend.location}: the Object Lock record {MARKER} is unreadable") from None
        probe.days = days
        return probe

    @classmethod
    def enable(cls, backend: S3Backend, days: int) -> ObjectLock:
        if days < 1:
            raise ObjectLockUnavailable("immutability needs at least one day of retention")
        if not cls.bucket_has_lock(backend):
            raise ObjectLockUnavailable(
                f"bucket {backend.bucket!r} has no Object Lock: immutable repositories need a bucket "
                "created with Object Lock enabled"
            )
        lock = cls(backend, days)
        backend.object_lock = lock
        backend._put_now(MARKER, json.dumps({"mode": MODE, "days": days}).encode())
        return lock

    # writing ---------------------------------------------------------------------------------

    def retain_until(self, now: float | None = None) -> datetime:
        now = time.time() if now is None else now
        return datetime.fromtimestamp(now, UTC) + timedelta(days=self.days + slack_days(self.days))

    def put_arguments(self, name: str) -> dict:
        if not protects(name):
            return {}
        return {"ObjectLockMode": MODE, "ObjectLockRetainUntilDate": self.retain_until()}

    def check_put(self, name: str) -> None:
        if name in PROTECTED_NAMES and self.original(name) is not None:
            raise StorageError(
                f"{name} of an immutable repository is locked: it cannot change (the keys and "
                "passphrase of an immutable repository are fixed)"
            )

    def written(self, name: str, response: dict, size: int) -> None:
        if not protects(name):
            return
        with self._lock:
            if name not in self._originals and response.get("VersionId"):
                until = self.retain_until().timestamp()
                self._originals[name] = Version(response["VersionId"], size, time.time(), until)

    # reading ---------------------------------------------------------------------------------

    def _versions(self, prefix_key: str) -> Iterator[tuple[str, list[dict], list[dict]]]:
        """(key, versions, delete markers) for every key under `prefix_key`, versions newest first."""
        backend = self.backend
        args = {"Bucket": backend.bucket, "Prefix": prefix_key}
        current: str | None = None
        versions: list[dict] = []
        markers: list[dict] = []
        while True:
            page = backend._call(
                "list versions in",
                prefix_key or backend.location,
                lambda a=dict(args): backend.client.list_object_versions(**a),
            )
            entries = [(v, False) for v in page.get("Versions", [])] + [
                (m, True) for m in page.get("DeleteMarkers", [])
            ]
            entries.sort(key=lambda e: e[0]["Key"])
            for entry, is_marker in entries:
                if entry["Key"] != current:
                    if current is not None:
                        yield current, versions, markers
                    current, versions, markers = entry["Key"], [], []
                (markers if is_marker else versions).append(entry)
            if not page.get("IsTruncated"):
                break
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["VersionIdMarker"] = page.get("NextVersionIdMarker")
        if current is not None:
            yield current, versions, markers

    @staticmethod
    def _oldest(versions: list[dict]) -> Version | None:
        if not versions:
            return None
        # Listings give a key's versions newest first; LastModified has second resolution, so
        # the listing order breaks ties.
        ordered = sorted(enumerate(versions), key=lambda e: (e[1]["LastModified"], -e[0]))
        first = ordered[0][1]
        return Version(first["VersionId"], int(first["Size"]), first["LastModified"].timestamp())

    def original(self, name: str, *, whole_directory: bool = False) -> Version | None:
        """The first version of `name` (None if it has none): the one that holds the locked data."""
        with self._lock:
            known = self._originals.get(name)
        if known is not None:
            return known
        directory = name.rsplit("/", 1)[0] + "/" if "/" in name else None
        if whole_directory and directory is not None and directory not in self._listed_dirs:
            list(self.list(directory))
            with self._lock:
                self._listed_dirs.add(directory)
                known = self._originals.get(name)
            if known is not None:
                return known
        key = self.backend.where.key(name)
        for found_key, versions, _markers in self._versions(key):
            if found_key == key and (version := self._oldest(versions)) is not None:
                with self._lock:
                    return self._originals.setdefault(name, version)
        return None

    def get(self, name: str) -> bytes:
        version = self.original(name, whole_directory=True)
        if version is None:
            raise ObjectNotFound(name)
        return self.backend._get_current(name, version.id)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        backend = self.backend
        for key, versions, _markers in self._versions(backend.where.key(prefix)):
            version = self._oldest(versions)
            if version is None:
                continue
            name = backend.where.name(key)
            with self._lock:
                version = self._originals.setdefault(name, version)
            yield ObjectInfo(name, version.size, version.modified)

    # reuse and deletion ----------------------------------------------------------------------

    def _retention(self, name: str, version: Version) -> float:
        if version.retain_until is None:
            head = self.backend._head(name, version.id) or {}
            until = head.get("ObjectLockRetainUntilDate")
            version.retain_until = until.timestamp() if until else 0.0
        return version.retain_until

    def locked_until(self, name: str) -> float | None:
        if not protects(name):
            return None
        version = self.original(name)
        if version is None:
            return None
        until = self._retention(name, version)
        return until if until > time.time() else None

    def claim(self, name: str) -> bool:
        """A backup reuses the object: make sure it stays locked for `days` from now; False if it is gone."""
        version = self.original(name)
        if version is None:
            return False
        now = time.time()
        if self._retention(name, version) >= now + self.days * DAY:
            return True
        until = self.retain_until(now)
        backend = self.backend
        from botocore.exceptions import ClientError

        try:
            backend._call(
                "extend the retention of",
                name,
                lambda: backend.client.put_object_retention(
                    Bucket=backend.bucket,
                    Key=backend.where.key(name),
                    VersionId=version.id,
                    Retention={"Mode": MODE, "RetainUntilDate": until},
                ),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchVersion", "404"):
                with self._lock:
                    self._originals.pop(name, None)
                return False
            raise backend._failed(exc, "extend the retention of", name) from None
        version.retain_until = until.timestamp()
        return True

    def delete(self, name: str) -> None:
        """Remove every version of `name`; ObjectLocked if one is still under retention."""
        from botocore.exceptions import ClientError

        backend = self.backend
        key = backend.where.key(name)
        found = [(k, v, m) for k, v, m in self._versions(key) if k == key]
        if not found or not found[0][1] and not protects(name) and not found[0][2]:
            raise ObjectNotFound(name)
        _key, versions, markers = found[0]
        if not versions and protects(name):
            raise ObjectNotFound(name)
        locked_until = 0.0
        # Markers and later versions first: if the original stays locked, it stays readable.
        for entry in markers + versions:
            try:
                backend._delete_key(name, entry["VersionId"])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "AccessDenied":
                    raise backend._failed(exc, "delete", name) from None
                head = backend._head(name, entry["VersionId"]) or {}
                until = head.get("ObjectLockRetainUntilDate")
                if until is None:
                    raise backend._failed(exc, "delete", name) from None
                locked_until = max(locked_until, until.timestamp())
            except ObjectNotFound:
                continue
        if locked_until:
            raise ObjectLocked(name, locked_until)
        with self._lock:
            self._originals.pop(name, None)
