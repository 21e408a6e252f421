"""Where replicas live: a directory on this machine (`LocalSite`) or on another one reached over
ssh (`surepoint.replica.protocol.RemoteSite`); both hand out sessions with the same calls."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

from surepoint.errors import InvalidArgument
from surepoint.replica.errors import ReplicaNotFound
from surepoint.replica.layout import RECORD, ReplicaDir
from surepoint.replica.receiver import ReplicaSession

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    """A replica directory's name: one path component of letters, digits, '_', '.', '-'."""
    if not NAME.match(name):
        raise InvalidArgument(f"{name!r} is not a valid replica name (letters, digits, '_', '.', '-')")
    return name


class Session(Protocol):
    def open(self, vm: str, source: dict[str, Any]) -> dict[str, Any]: ...
    def begin(self, point_id: str, sizes: dict[str, int]) -> None: ...
    def seed_from(
        self, repository: str, point: str, devices: list[str], passphrase: Callable[[], str] | None = None
    ) -> dict[str, Any]: ...
    def checksums(self, device: str, offset: int, length: int, block: int) -> bytes: ...
    def write(self, device: str, offset: int, data: bytes) -> None: ...
    def zero(self, device: str, offset: int, length: int) -> None: ...
    def commit(self, point: dict[str, Any], keep: int) -> dict[str, Any]: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class Site(Protocol):
    location: str

    def session(self, name: str) -> Session: ...
    def list(self, name: str | None = None) -> list[dict[str, Any]]: ...
    def forget(self, name: str, point_ids: list[str]) -> list[str]: ...
    def remove(self, name: str) -> None: ...
    def close(self) -> None: ...


def describe(replica: ReplicaDir, sizes: bool = True) -> dict[str, Any]:
    """A replica as `replica list` shows it: its record, each point with the bytes its own files hold."""
    points = []
    for p in replica.points:
        entry = asdict(p)
        if sizes:
            entry["bytes"] = replica.point_bytes(p)
        points.append(entry)
    return {
        "name": os.path.basename(replica.path),
        "path": replica.path,
        "vm": replica.vm,
        "state": replica.state,
        "points": points,
        "disks": [asdict(d) for d in replica.source.disks],
    }


class LocalSite:
    """Replicas in a directory of this machine."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root

    def session(self, name: str) -> ReplicaSession:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        return ReplicaSession(os.path.join(self.root, check_name(name)))

    def _replica_paths(self, name: str | None) -> list[str]:
        if name is not None:
            return [os.path.join(self.root, check_name(name))]
        if os.path.exists(os.path.join(self.root, RECORD)):  # the path is a replica itself
            return [self.root]
        if not os.path.isdir(self.root):
            raise ReplicaNotFound(f"no replicas at {self.root}")
        return sorted(
            os.path.join(self.root, n) for n in os.listdir(self.root) if ReplicaDir.exists(os.path.join(self.root, n))
        )

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        return [describe(ReplicaDir.open(p)) for p in self._replica_paths(name)]

    def forget(self, name: str, point_ids: list[str]) -> list[str]:
        with ReplicaDir.open(os.path.join(self.root, check_name(name))) as replica:
            return replica.forget(point_ids)

    def remove(self, name: str) -> None:
        path = os.path.join(self.root, check_name(name))
        replica = ReplicaDir.open(path)
        with replica:
            shutil.rmtree(os.path.join(path, "disks"), ignore_errors=True)
            shutil.rmtree(os.path.join(path, "failover"), ignore_errors=True)
            os.unlink(os.path.join(path, RECORD))
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        pass
