"""A surepoint repository: config and keys, chunk store, fixed indexes and restore-point manifests."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator, Sequence

from surepoint.errors import (
    AmbiguousReference,
    DamagedData,
    InvalidRepositoryConfig,
    NoSuchDisk,
    NotARepository,
    NotEncrypted,
    RestorePointForgotten,
    RestorePointNotFound,
    SurepointError,
    UnreadableRestorePoints,
    WrongPassphrase,
)
from surepoint.repo import crypto
from surepoint.repo.chunks import CHUNK_PREFIX, TRASH_PREFIX, ChunkStore
from surepoint.repo.envelope import KIND_INDEX, KIND_MANIFEST, Envelope
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.known import KnownRepositories
from surepoint.repo.locks import LOCK_PREFIX, reader_lock
from surepoint.repo.manifest import RestorePoint, peek_name_and_time
from surepoint.storage.backend import Backend, ObjectNotFound
from surepoint.timestamps import utc_now

FORMAT = "surepoint-repository"
FORMAT_VERSION = 1
CONFIG = "config"
MANIFEST_PREFIX = "restorepoints/"
INDEX_PREFIX = "indexes/"
# every prefix under which objects are written (chunks fan out by the first byte of their id)
LAYOUT_PREFIXES = (INDEX_PREFIX, MANIFEST_PREFIX, LOCK_PREFIX, TRASH_PREFIX) + tuple(
    f"{CHUNK_PREFIX}{byte:02x}/" for byte in range(256)
)
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20


# Bounds on what a config may ask for: no hang (a chunk size of 7), no gigabytes of memory
# (scrypt's 128 * n * r bytes), nothing a real repository would ever use.
# zstd's levels: 1 to 22, and its fast levels -7 to -1 (0 would mean "zstd's default", so it is not one).
COMPRESSION_LEVELS = [*range(-7, 0), *range(1, 23)]
DEFAULT_COMPRESSION_LEVEL = 1  # zstd 1, as Proxmox Backup Server: ~1.8x level 3's speed for ~10% more stored
MAX_SCRYPT_MEMORY = 256 << 20


def check_config(config: dict) -> None:
    """Every field of a repository config of the right type and within bounds (DamagedData if not)."""

    def bad(what: str) -> DamagedData:
        return DamagedData(f"repository config is damaged: {what}")

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    repo_id = config.get("id")
    if not isinstance(repo_id, str) or not 0 < len(repo_id) <= 64 or not repo_id.isalnum():
        raise bad("id")
    size = config.get("chunk_size")
    if not integer(size) or size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise bad(f"chunk_size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    level = config.get("compression_level", DEFAULT_COMPRESSION_LEVEL)
    if not integer(level) or level not in COMPRESSION_LEVELS:
        raise bad("compression_level must be -7 to -1 or 1 to 22")
    record = config.get("encryption")
    if record is None:
        return
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("cipher"), str)
        or record["cipher"] not in crypto.CIPHERS
    ):
        raise bad("encryption")
    kdf = record.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise bad("encryption.kdf")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not (integer(n) and integer(r) and integer(p)) or n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise bad("encryption.kdf parameters")
    if 128 * n * r > MAX_SCRYPT_MEMORY or n < 1 << 14:
        raise bad("encryption.kdf parameters out of bounds (too weak or too much memory)")
    for key, limit in (("salt", 128), ("wrapped_key", 1024)):
        if not isinstance(kdf.get(key) if key == "salt" else record.get(key), str):
            raise bad(f"encryption.{key}")
        if len(kdf[key] if key == "salt" else record[key]) > limit:
            raise bad(f"encryption.{key} too long")


def _config_bytes(config: dict) -> bytes:
    return json.dumps(config, indent=2).encode()


def _add_mac(backend: Backend, raw: bytes, config: dict, keys: crypto.Keys) -> dict:
    """Give a config written before MACs existed its MAC (the key proves the config is the owner's
    own only as far as the client's memory of its encryption goes; from now on it is authenticated).
    Written only if the config is still the one read (passwd may be replacing it), and not at all on
    storage that cannot take it: the next open tries again."""
    config = dict(config)
    config[crypto.CONFIG_MAC_FIELD] = crypto.config_mac(keys, config)
    with contextlib.suppress(SurepointError):
        if backend.get(CONFIG) == raw:
            backend.put(CONFIG, _config_bytes(config))
    return config


class Repository:
    def __init__(self, backend: Backend, config: dict, keys: crypto.Keys | None) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.envelope = Envelope(keys, config.get("compression_level", DEFAULT_COMPRESSION_LEVEL))
        self.chunks = ChunkStore(backend, self.envelope, keys.chunk_id if keys else None)
        self.known: KnownRepositories | None = None
        self.damaged_manifests: list[str] = []
        self._damaged_hints: dict[str, tuple[str | None, str | None]] = {}

    @property
    def id(self) -> str:
        return self.config["id"]

    @property
    def chunk_size(self) -> int:
        return self.config["chunk_size"]

    @property
    def encryption(self) -> str:
        return self.config["encryption"]["cipher"] if self.config.get("encryption") else "none"

    @classmethod
    def create(
        cls,
        backend: Backend,
        *,
        encryption: str = "none",
        passphrase: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        known: KnownRepositories | None = None,
    ) -> Repository:
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidRepositoryConfig("chunk size must be a power of two between 64 KiB and 64 MiB")
        config: dict = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "id": secrets.token_hex(16),
            "created": utc_now(),
            "chunk_size": chunk_size,
            "digest": "blake3",
            "compression": "zstd",
            "compression_level": compression_level,
            "encryption": None,
        }
        keys = None
        if encryption != "none":
            keys, config["encryption"] = crypto.new_key_record(encryption, passphrase or "", config["id"])
            config[crypto.CONFIG_MAC_FIELD] = crypto.config_mac(keys, config)
        # Every prefix exists from the start, so writing an object never has to make one durable.
        backend.prepare(LAYOUT_PREFIXES)
        backend.put(CONFIG, _config_bytes(config))
        repository = cls(backend, config, keys)
        repository.known = known
        repository.remember()
        return repository

    @classmethod
    def open(
        cls, backend: Backend, passphrase: Callable[[], str], *, known: KnownRepositories | None = None
    ) -> Repository:
        """Open the repository, checking its config; with `known`, against this machine's memory too.

        An encrypted repository's config must carry a MAC that matches (repo/crypto.py). A config
        written before MACs existed gets one here, on the first open that has the key; once `known`
        has seen it, a config without one is refused."""
        try:
            raw = backend.get(CONFIG)
        except ObjectNotFound:
            raise NotARepository(f"{backend.location} is not a surepoint repository (it has no config)") from None
        try:
            config = json.loads(raw)
        except ValueError:
            config = None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            if known is not None and known.knows_location(backend.location):
                raise DamagedData(f"repository config at {backend.location} is damaged (it is not a surepoint config)")
            if config is None:
                raise NotARepository(f"{backend.location}: repository config is unreadable")
            raise NotARepository(f"{backend.location} is not a surepoint repository")
        if known is not None:
            known.check(config, backend.location)
        if config.get("version") != FORMAT_VERSION and crypto.CONFIG_MAC_FIELD not in config:
            raise NotARepository(f"repository format version {config.get('version')!r} is not supported")
        check_config(config)
        keys = None
        if config.get("encryption"):
            try:
                keys = crypto.unwrap_keys(config["encryption"], passphrase(), config["id"])
            except WrongPassphrase:
                fingerprint = crypto.key_record_fingerprint(config["encryption"])
                if known is not None and known.key_record_changed(config["id"], fingerprint):
                    raise crypto.ConfigNotAuthentic(
                        f"repository config at {backend.location}: its key record does not open with this "
                        "passphrase and is not the one this machine saw before (it was replaced, or the "
                        "passphrase was changed elsewhere and the new one is needed)"
                    ) from None
                raise
            if crypto.CONFIG_MAC_FIELD in config:
                if not crypto.config_mac_matches(keys, config):
                    raise crypto.ConfigNotAuthentic(
                        f"repository config at {backend.location} fails authentication (its MAC does not match: "
                        "a field was changed by someone without the key): refusing it, nothing was written"
                    )
            else:
                config = _add_mac(backend, raw, config, keys)
        for setting, value in (("version", FORMAT_VERSION), ("digest", "blake3"), ("compression", "zstd")):
            if config.get(setting, value) != value:
                what = "format version" if setting == "version" else setting
                raise NotARepository(f"repository {what} {config.get(setting)!r} is not supported")
        repository = cls(backend, config, keys)
        repository.known = known
        repository.remember()
        return repository

    def remember(self) -> None:
        """Note in this machine's memory (if the repository was opened with one) what its config is now."""
        if self.known is not None:
            self.known.remember(
                self.id,
                encryption=self.encryption,
                location=self.backend.location,
                mac=crypto.CONFIG_MAC_FIELD in self.config,
                key_record=crypto.key_record_fingerprint(self.config.get("encryption")),
            )

    def change_passphrase(self, old_passphrase: str, new_passphrase: str) -> None:
        """Rewrap the repository keys; the config is replaced atomically, nothing else is touched."""
        if not self.config.get("encryption"):
            raise NotEncrypted("this repository is not encrypted: it has no passphrase")
        config = dict(self.config)
        config["encryption"] = crypto.rewrap_keys(config["encryption"], old_passphrase, new_passphrase, self.id)
        config[crypto.CONFIG_MAC_FIELD] = crypto.config_mac(self.keys, config)
        self.backend.put(CONFIG, _config_bytes(config))
        self.config = config
        self.remember()

    # restore points -------------------------------------------------------------------------

    def new_restore_point_id(self) -> str:
        return secrets.token_hex(8)

    def index_name(self, restore_point_id: str, disk_number: int) -> str:
        return f"{INDEX_PREFIX}{restore_point_id}.{disk_number}"

    def list_restore_points(self) -> list[RestorePoint]:
        """Every committed restore point, oldest first. Unreadable manifests go to `damaged_manifests`
        (and what each still shows of its name and time to `_damaged_hints`)."""
        points = []
        self.damaged_manifests = []
        self._damaged_hints = {}
        for info in self.backend.list(MANIFEST_PREFIX):
            try:
                points.append(self._read_manifest(info.name))
            except (DamagedData, ObjectNotFound):
                self.damaged_manifests.append(info.name)
        points.sort(key=lambda p: (p.created, p.id))
        return points

    def _read_manifest(self, name: str) -> RestorePoint:
        data = self.envelope.open(KIND_MANIFEST, name, self.backend.get(name))
        try:
            point = RestorePoint.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            self._damaged_hints[name] = peek_name_and_time(data)
            raise DamagedData(f"manifest {name} is damaged ({exc})") from None
        if MANIFEST_PREFIX + point.id != name:
            raise DamagedData(f"manifest {name} is damaged (it names restore point {point.id!r})")
        return point

    def resolve(self, ref: str) -> RestorePoint:
        """A restore point by id, unambiguous id prefix, or NAME:latest."""
        points = self.list_restore_points()
        if ref.endswith(":latest"):
            name = ref[: -len(":latest")]
            named = [p for p in points if p.name == name]
            newer_damaged = [
                m
                for m in self.damaged_manifests
                if self._damaged_hints.get(m, (None, None))[0] in (name, None)
                and (not named or (self._damaged_hints.get(m, (None, None))[1] or "~") > named[-1].created)
            ]
            if newer_damaged:
                raise UnreadableRestorePoints(
                    f"the latest restore point named {name!r} may be in a damaged manifest "
                    f"({', '.join(newer_damaged)}): refusing to pick an older one; give a restore point id"
                )
            if not named:
                raise RestorePointNotFound(f"no restore point named {name!r}")
            return named[-1]
        if ref == "latest":
            if not points:
                raise RestorePointNotFound("the repository has no restore points")
            return points[-1]
        matches = [p for p in points if p.id.startswith(ref)] if ref else []
        if not matches:
            raise RestorePointNotFound(f"no restore point {ref!r}")
        if len(matches) > 1:
            raise AmbiguousReference(f"restore point prefix {ref!r} is ambiguous: {', '.join(p.id for p in matches)}")
        return matches[0]

    def latest_named(self, name: str) -> RestorePoint | None:
        named = [p for p in self.list_restore_points() if p.name == name]
        return named[-1] if named else None

    def load_index(self, restore_point: RestorePoint, disk_number: int) -> FixedIndex:
        disk = next((d for d in restore_point.disks if d.number == disk_number), None)
        if disk is None:
            numbers = ", ".join(str(d.number) for d in restore_point.disks)
            raise NoSuchDisk(f"restore point {restore_point.id} has no disk {disk_number} (disks: {numbers})")
        what = f"index of disk {disk_number} of restore point {restore_point.id}"
        try:
            blob = self.backend.get(disk.index)
        except ObjectNotFound:
            if not self.backend.exists(MANIFEST_PREFIX + restore_point.id):  # forgotten since it was listed
                raise RestorePointForgotten(
                    f"restore point {restore_point.id} was removed by a concurrent forget"
                ) from None
            raise DamagedData(f"{what} is missing") from None
        try:
            index = FixedIndex.decode(self.envelope.open(KIND_INDEX, disk.index, blob), what)
        except DamagedData as exc:
            raise DamagedData(f"{what} is damaged ({exc})") from None
        if index.disk_size != disk.size:
            raise DamagedData(f"{what} is damaged (its disk size does not match the manifest)")
        return index

    def commit(self, restore_point: RestorePoint, indexes: dict[int, FixedIndex]) -> None:
        """Make a restore point exist: indexes, then a sync of everything written, then the manifest."""
        for disk in restore_point.disks:
            blob = self.envelope.seal(KIND_INDEX, disk.index, indexes[disk.number].encode())
            self.backend.put(disk.index, blob, durable=False)
        self.backend.sync()
        name = MANIFEST_PREFIX + restore_point.id
        self.backend.put(name, self.envelope.seal(KIND_MANIFEST, name, restore_point.to_json()), durable=True)

    @contextlib.contextmanager
    def reading(
        self, points: Sequence[RestorePoint], kind: str, purpose: str, *, require_all: bool = True
    ) -> Iterator[list[str]]:
        """Hold a reader lock on `points` (forget keeps them, so gc keeps their chunks) while the block runs.

        Yields the ids of those forgotten before the lock was in place (RestorePointForgotten
        instead when `require_all`)."""
        with reader_lock(self.backend, kind, [p.id for p in points], purpose):
            gone = [p.id for p in points if not self.backend.exists(MANIFEST_PREFIX + p.id)]
            if gone and require_all:
                raise RestorePointForgotten(
                    f"restore point {', '.join(gone)} was removed by a concurrent forget before it could be read"
                )
            yield gone

    def delete_restore_point(self, restore_point: RestorePoint) -> None:
        """Remove the manifest first (the point ceases to exist), then its indexes.

        The manifest's removal is made durable before anything it refers to goes: after a power
        cut, a forgotten point must not come back once gc has removed its index or chunks."""
        with contextlib.suppress(ObjectNotFound):
            self.backend.delete(MANIFEST_PREFIX + restore_point.id)
        self.backend.sync()
        for disk in restore_point.disks:
            with contextlib.suppress(ObjectNotFound):
                self.backend.delete(disk.index)
