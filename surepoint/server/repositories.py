"""The server's read-only view of its repositories: restore points with their verification states,
systems and their last good point, stored size. Opened with the passphrase file from the config."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime

from surepoint import storage
from surepoint.catalog import Catalog
from surepoint.errors import SurepointError, UsageError
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.server.config import RepositoryConfig, ServerConfig

CACHE_SECONDS = 3.0


def catalog_path(config: ServerConfig, repo: RepositoryConfig) -> str:
    return config.catalog_of(repo)


def _age_hours(created: str) -> float:
    when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return (datetime.now(UTC) - when).total_seconds() / 3600


class Repositories:
    """Restore points of every configured repository, read at most every few seconds."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._cache: dict[str, tuple[float, list[dict], dict]] = {}
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def open(self, name: str) -> Repository:
        repo = self.config.repository(name)

        def passphrase() -> str:
            if not repo.passphrase_file:
                raise UsageError(f"repository {name} is encrypted: set passphrase_file in the server config")
            try:
                with open(repo.passphrase_file) as f:
                    return f.read().rstrip("\n")
            except OSError as exc:
                raise UsageError(f"cannot read the passphrase file of repository {name}: {exc.strerror}") from None

        return Repository.open(storage.open(repo.location), passphrase)

    def points(self, name: str, *, fresh: bool = False) -> list[dict]:
        """Restore points of repository `name`, newest first, with state, integrity and recovery."""
        return self._read(name, fresh)[1]

    def info(self, name: str) -> dict:
        return self._read(name, False)[2]

    def _read(self, name: str, fresh: bool) -> tuple[float, list[dict], dict]:
        with self._lock:
            cached = self._cache.get(name)
            if cached and not fresh and time.monotonic() - cached[0] < CACHE_SECONDS:
                return cached
        repo_config = self.config.repository(name)
        try:
            repo = self.open(name)
        except SurepointError as exc:
            entry = (time.monotonic(), [], {"name": name, "location": repo_config.location, "error": str(exc)})
            with self._lock:
                self._cache[name] = entry
            return entry
        path = catalog_path(self.config, repo_config)
        catalog = Catalog(path) if os.path.exists(path) else None
        try:
            points = [self._point(p, repo, catalog) for p in repo.list_restore_points()]
        finally:
            if catalog is not None:
                catalog.close()
        points.reverse()
        info = {
            "name": name,
            "id": repo.id,
            "location": repo_config.location,
            "encryption": repo.encryption,
            "restore_points": len(points),
            "stored_bytes": _stored_bytes(repo),
            "growth_24h": sum(p["stored_bytes"] for p in points if _age_hours(p["created"]) <= 24),
            "growth_7d": sum(p["stored_bytes"] for p in points if _age_hours(p["created"]) <= 24 * 7),
            "damaged_manifests": list(repo.damaged_manifests),
        }
        entry = (time.monotonic(), points, info)
        with self._lock:
            self._cache[name] = entry
        return entry

    @staticmethod
    def _point(point: RestorePoint, repo: Repository, catalog: Catalog | None) -> dict:
        data = asdict(point)
        data["size"] = point.size
        data["bootable"] = point.bootable
        data["stored_bytes"] = sum(d.stored_bytes for d in point.disks)
        data["read_bytes"] = sum(d.read_bytes for d in point.disks)
        if catalog is not None:
            data.update(catalog.verification_summary(repo.id, point.id, bootable=point.bootable))
        else:
            data.update(state="unverified", integrity="unverified", recovery="unverified")
        return data

    def point(self, name: str, point_id: str) -> dict | None:
        return next((p for p in self.points(name) if p["id"] == point_id), None)

    def systems(self) -> list[dict]:
        """Every backed-up system (restore point name) with its last point and last good point."""
        found: dict[tuple[str, str], dict] = {}
        for repo_name in self.config.repositories:
            for p in self.points(repo_name):
                key = (repo_name, p["name"])
                entry = found.setdefault(
                    key,
                    {"repository": repo_name, "name": p["name"], "points": 0, "last": None, "last_good": None},
                )
                entry["points"] += 1
                if entry["last"] is None:
                    entry["last"] = p
                if entry["last_good"] is None and p["state"] not in ("damaged", "failed"):
                    entry["last_good"] = p
        for entry in found.values():
            good = entry["last_good"]
            entry["rpo_hours"] = round(_age_hours(good["created"]), 2) if good else None
            entry["is_vm"] = bool(entry["last"] and entry["last"]["source"].get("kind") == "vm")
        return sorted(found.values(), key=lambda e: (e["repository"], e["name"]))


def _stored_bytes(repo: Repository) -> int:
    try:
        return sum(info.size for info in repo.backend.list(""))
    except Exception:  # noqa: BLE001 - a size is nice to have; listing errors show elsewhere
        return 0
