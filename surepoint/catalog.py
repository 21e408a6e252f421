"""The catalog: a SQLite database of events, verification results and chunk check times.

The repository holds the data and is the truth about what restore points exist; the catalog
holds what happened to them (jobs, phases, verification). Losing it loses history, never data.

No secret is kept in the catalog. A transaction-log prune that waits for verification (log mode
after-verify) needs its writer's settings later; a password in them (`password = ...` in the job
file) is moved to a credentials file of its own (0600, in the 0700 directory `<catalog>.credentials/`)
that the row only names, and that file is deleted as soon as the prune has run or
is dropped. A writer configured with `password_file` is referenced, never copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from surepoint.timestamps import utc_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    repository TEXT NOT NULL,
    restore_point TEXT,
    source TEXT,
    component TEXT NOT NULL,
    phase TEXT NOT NULL,
    outcome TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_point ON events(repository, restore_point);
CREATE TABLE IF NOT EXISTS verifications (
    id INTEGER PRIMARY KEY,
    repository TEXT NOT NULL,
    restore_point TEXT NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,          -- integrity | recovery
    state TEXT NOT NULL,         -- integrity: verified | damaged; recovery: verified | failed
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS verifications_by_point ON verifications(repository, restore_point);
CREATE TABLE IF NOT EXISTS pending_log_prunes (
    id INTEGER PRIMARY KEY,
    repository TEXT NOT NULL,
    restore_point TEXT NOT NULL,
    source TEXT,
    writer_type TEXT NOT NULL,
    writer_config TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created TEXT NOT NULL,
    done TEXT,
    credentials TEXT             -- the name of this prune's credentials file, while it waits
);
CREATE TABLE IF NOT EXISTS file_listings (   -- the files of one guest filesystem, shared by every
    id INTEGER PRIMARY KEY,                  -- restore point where that filesystem's bytes are the same
    repository TEXT NOT NULL,
    content TEXT NOT NULL,                   -- digest of the chunk ids under the filesystem
    fstype TEXT NOT NULL DEFAULT '',
    entries INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS file_listings_by_content ON file_listings(repository, content);
CREATE TABLE IF NOT EXISTS file_entries (
    listing INTEGER NOT NULL,
    path TEXT NOT NULL,                      -- from the filesystem's root ("/etc/passwd")
    name TEXT NOT NULL,                      -- the last component
    type TEXT NOT NULL,                      -- f file, d directory, l symlink, o other
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS file_entries_by_listing ON file_entries(listing);
CREATE TABLE IF NOT EXISTS file_index (      -- which listing each filesystem of a restore point has
    repository TEXT NOT NULL,
    restore_point TEXT NOT NULL,
    point_name TEXT NOT NULL,
    point_created TEXT NOT NULL,
    disk INTEGER NOT NULL,
    volume TEXT NOT NULL,                    -- part1, fs, lvm-vg-lv
    mountpoint TEXT,                         -- where the guest mounts it (its /etc/fstab), if known
    listing INTEGER NOT NULL,
    PRIMARY KEY (repository, restore_point, disk, volume)
);
CREATE TABLE IF NOT EXISTS chunk_checks (
    repository TEXT NOT NULL,
    chunk_id BLOB NOT NULL,
    checked_at TEXT NOT NULL,
    PRIMARY KEY (repository, chunk_id)
);
"""


# Writer settings that are secrets: never stored in the catalog (see the module docstring).
SECRET_SETTINGS = ("password",)


def default_catalog_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "surepoint", "catalog.sqlite")


now_iso = utc_now  # the one time-stamp format (surepoint.timestamps)


@dataclass
class Event:
    time: str
    restore_point: str | None
    source: str | None
    component: str
    phase: str
    outcome: str
    message: str


class Catalog:
    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)  # job settings waiting for after-verify may include credentials
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # what is deleted or overwritten is zeroed, not left in free pages
        self._db.executescript(SCHEMA)
        self._write_lock = threading.Lock()  # one connection shared by a job's threads
        self._move_secrets_out()

    def close(self) -> None:
        self._db.close()

    # events -----------------------------------------------------------------------------------

    def add_event(
        self,
        repository: str,
        component: str,
        phase: str,
        outcome: str,
        message: str = "",
        *,
        restore_point: str | None = None,
        source: str | None = None,
    ) -> None:
        with self._write_lock, self._db:
            self._db.execute(
                "INSERT INTO events(time, repository, restore_point, source, component, phase, outcome, message)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now_iso(), repository, restore_point, source, component, phase, outcome, message),
            )

    def events(self, repository: str, restore_point: str | None = None, limit: int = 200) -> list[Event]:
        sql = "SELECT time, restore_point, source, component, phase, outcome, message FROM events WHERE repository=?"
        args: list = [repository]
        if restore_point:
            sql += " AND restore_point=?"
            args.append(restore_point)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [Event(*row) for row in reversed(self._db.execute(sql, args).fetchall())]

    # verification -----------------------------------------------------------------------------

    def record_verification(self, repository: str, restore_point: str, kind: str, state: str, details: dict) -> None:
        with self._write_lock, self._db:
            self._db.execute(
                "INSERT INTO verifications(repository, restore_point, time, kind, state, details)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (repository, restore_point, now_iso(), kind, state, json.dumps(details)),
            )

    def latest_verification(self, repository: str, restore_point: str, kind: str) -> dict | None:
        row = self._db.execute(
            "SELECT time, state, details FROM verifications WHERE repository=? AND restore_point=? AND kind=?"
            " ORDER BY id DESC LIMIT 1",
            (repository, restore_point, kind),
        ).fetchone()
        if row is None:
            return None
        return {"time": row[0], "state": row[1], "details": json.loads(row[2])}

    def verification_summary(self, repository: str, restore_point: str, bootable: bool = False) -> dict[str, str]:
        """The latest integrity and recovery results of a restore point, and what they add up to.

        integrity: unverified / verified / damaged (its chunks re-read and checked) / healed (damaged
        once, whole again).
        recovery: unverified / verified / failed (booted in a lab and its tests run).
        state: damaged or failed when either says so; verified when its chunks are intact and, for
        a restore point a lab can boot (RestorePoint.bootable), the lab tests passed too; intact when only the chunks
        were checked; boots when only the lab ran; else unverified.
        """
        integrity = self.latest_verification(repository, restore_point, "integrity")
        recovery = self.latest_verification(repository, restore_point, "recovery")
        integrity_state = integrity["state"] if integrity else "unverified"
        recovery_state = recovery["state"] if recovery else "unverified"
        if integrity_state == "damaged":
            state = "damaged"
        elif recovery_state == "failed":
            state = "failed"
        elif integrity_state == "healed":  # was damaged, made whole by verify --repair or a later backup
            state = "healed"
        elif integrity_state == "verified" and (recovery_state == "verified" or not bootable):
            state = "verified"
        elif integrity_state == "verified":
            state = "intact"
        elif recovery_state == "verified":
            state = "boots"
        else:
            state = "unverified"
        return {"state": state, "integrity": integrity_state, "recovery": recovery_state}

    def state_of(self, repository: str, restore_point: str, bootable: bool = False) -> str:
        """The overall verification state (see verification_summary)."""
        return self.verification_summary(repository, restore_point, bootable)["state"]

    # transaction logs waiting for verification (log mode after-verify) ---------------------

    def add_pending_prune(
        self, repository: str, restore_point: str, source: str, writer_type: str, config: dict, metadata: dict
    ) -> None:
        public, secret = split_secrets(config)
        credentials = self._write_credentials(secret) if secret else None
        with self._write_lock, self._db:
            self._db.execute(
                "INSERT INTO pending_log_prunes(repository, restore_point, source, writer_type, writer_config,"
                " metadata, created, credentials) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    repository,
                    restore_point,
                    source,
                    writer_type,
                    json.dumps(public),
                    json.dumps(metadata),
                    now_iso(),
                    credentials,
                ),
            )

    def pending_prunes(self, repository: str, restore_point: str | None = None) -> list[dict]:
        sql = (
            "SELECT id, restore_point, source, writer_type, writer_config, metadata, credentials"
            " FROM pending_log_prunes WHERE repository=? AND done IS NULL"
        )
        args: list = [repository]
        if restore_point:
            sql += " AND restore_point=?"
            args.append(restore_point)
        return [
            {
                "id": r[0],
                "restore_point": r[1],
                "source": r[2],
                "writer_type": r[3],
                "writer_config": {**json.loads(r[4]), **self._read_credentials(r[6])},
                "metadata": json.loads(r[5]),
            }
            for r in self._db.execute(sql + " ORDER BY id", args).fetchall()
        ]

    def mark_prune_done(self, prune_id: int) -> None:
        """The prune ran (or is dropped): it is history now, and its credentials file is deleted."""
        with self._write_lock, self._db:
            row = self._db.execute("SELECT credentials FROM pending_log_prunes WHERE id=?", (prune_id,)).fetchone()
            self._db.execute("UPDATE pending_log_prunes SET done=?, credentials=NULL WHERE id=?", (now_iso(), prune_id))
        if row and row[0]:
            self._remove_credentials(row[0])

    def drop_pending_prunes(self, repository: str, restore_points: Iterable[str]) -> int:
        """Forgotten restore points wait for no prune: end theirs (credentials deleted); return how many."""
        dropped = 0
        for point in restore_points:
            for pending in self.pending_prunes(repository, point):
                self.mark_prune_done(pending["id"])
                dropped += 1
        return dropped

    # credentials of waiting prunes ----------------------------------------------------------

    def _credentials_dir(self) -> str:
        return os.path.abspath(self.path) + ".credentials"

    def _write_credentials(self, secret: dict) -> str:
        directory = self._credentials_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        name = f"prune-{secrets.token_hex(8)}.json"
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secret, f)
            f.flush()
            os.fsync(f.fileno())
        return name

    def _read_credentials(self, name: str | None) -> dict:
        if not name:
            return {}
        try:
            with open(os.path.join(self._credentials_dir(), os.path.basename(name))) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}  # gone: the writer then fails to log in, reported as a failed prune; logs are kept
        return data if isinstance(data, dict) else {}

    def _remove_credentials(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._credentials_dir(), os.path.basename(name)))

    def _move_secrets_out(self) -> None:
        """Catalogs written before credentials files: waiting prunes get one, finished ones lose their secret."""
        with self._write_lock, self._db:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(pending_log_prunes)")}
            if "credentials" not in columns:
                self._db.execute("ALTER TABLE pending_log_prunes ADD COLUMN credentials TEXT")
            rows = self._db.execute(
                "SELECT id, writer_config, done FROM pending_log_prunes WHERE "
                + " OR ".join("writer_config LIKE ?" for _ in SECRET_SETTINGS),
                [f'%"{key}"%' for key in SECRET_SETTINGS],
            ).fetchall()
            moved = False
            for prune_id, raw, done in rows:
                public, secret = split_secrets(json.loads(raw))
                if not secret:
                    continue
                credentials = None if done else self._write_credentials(secret)
                self._db.execute(
                    "UPDATE pending_log_prunes SET writer_config=?, credentials=? WHERE id=?",
                    (json.dumps(public), credentials, prune_id),
                )
                moved = True
        if moved:  # the old rows' pages must not stay behind in the write-ahead log either
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def record_chunk_checks(self, repository: str, chunk_ids: Iterable[bytes]) -> None:
        stamp = now_iso()
        with self._write_lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO chunk_checks(repository, chunk_id, checked_at) VALUES (?, ?, ?)",
                ((repository, cid, stamp) for cid in chunk_ids),
            )

    def forget_chunk_checks(self, repository: str, chunk_ids: Iterable[bytes]) -> None:
        with self._write_lock, self._db:
            self._db.executemany(
                "DELETE FROM chunk_checks WHERE repository=? AND chunk_id=?",
                ((repository, cid) for cid in chunk_ids),
            )

    def chunks_checked_since(self, repository: str, since: str) -> set[bytes]:
        rows = self._db.execute(
            "SELECT chunk_id FROM chunk_checks WHERE repository=? AND checked_at>=?", (repository, since)
        )
        return {bytes(r[0]) for r in rows}


@dataclass
class IndexedVolume:
    disk: int
    volume: str
    mountpoint: str | None
    listing: int


@dataclass
class FoundFile:
    restore_point: str
    point_name: str
    point_created: str
    guest_path: str  # the guest's path when the filesystem's mount point is known, else diskN/VOLUME/path
    type: str
    size: int
    mtime_ns: int


# the guest path of an entry: mount point + path inside the filesystem
_GUEST_PATH = (
    "CASE WHEN i.mountpoint IS NULL THEN 'disk' || i.disk || '/' || i.volume || e.path "
    "WHEN i.mountpoint = '/' THEN e.path ELSE i.mountpoint || e.path END"
)


class FileIndexCatalog:
    """The file index: the file lists of guest filesystems (see surepoint.jobs.file_index)."""

    def __init__(self, catalog: Catalog) -> None:
        self._db = catalog._db
        self._lock = catalog._write_lock

    def listing_for(self, repository: str, content: str) -> int | None:
        row = self._db.execute(
            "SELECT id FROM file_listings WHERE repository = ? AND content = ?", (repository, content)
        ).fetchone()
        return row[0] if row else None

    def add_listing(
        self, repository: str, content: str, fstype: str, entries: Iterable[tuple[str, str, str, int, int]]
    ) -> int:
        """A new listing of (path, name, type, size, mtime_ns) entries; the existing one for `content`."""
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT id FROM file_listings WHERE repository = ? AND content = ?", (repository, content)
            ).fetchone()
            if row:
                return row[0]
            cur = self._db.execute(
                "INSERT INTO file_listings (repository, content, fstype, created) VALUES (?, ?, ?, ?)",
                (repository, content, fstype, now_iso()),
            )
            listing = cur.lastrowid
            count = 0
            batch: list[tuple] = []
            for entry in entries:
                batch.append((listing, *entry))
                if len(batch) >= 5000:
                    self._db.executemany("INSERT INTO file_entries VALUES (?, ?, ?, ?, ?, ?)", batch)
                    count += len(batch)
                    batch = []
            self._db.executemany("INSERT INTO file_entries VALUES (?, ?, ?, ?, ?, ?)", batch)
            count += len(batch)
            self._db.execute("UPDATE file_listings SET entries = ? WHERE id = ?", (count, listing))
            return int(listing)  # type: ignore[arg-type]

    def record_point(
        self, repository: str, restore_point: str, name: str, created: str, volumes: list[IndexedVolume]
    ) -> None:
        """The filesystems of a restore point and their listings (replacing what was recorded before)."""
        with self._lock, self._db:
            self._db.execute(
                "DELETE FROM file_index WHERE repository = ? AND restore_point = ?", (repository, restore_point)
            )
            self._db.executemany(
                "INSERT INTO file_index VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (repository, restore_point, name, created, v.disk, v.volume, v.mountpoint, v.listing)
                    for v in volumes
                ],
            )

    def point_volumes(self, repository: str, restore_point: str) -> list[IndexedVolume]:
        rows = self._db.execute(
            "SELECT disk, volume, mountpoint, listing FROM file_index WHERE repository = ? AND restore_point = ?",
            (repository, restore_point),
        ).fetchall()
        return [IndexedVolume(*row) for row in rows]

    def indexed_points(self, repository: str, name: str | None = None) -> dict[str, tuple[str, str]]:
        """restore point id -> (name, created) of every indexed restore point (of `name`)."""
        sql = "SELECT DISTINCT restore_point, point_name, point_created FROM file_index WHERE repository = ?"
        args: list = [repository]
        if name is not None:
            sql += " AND point_name = ?"
            args.append(name)
        return {row[0]: (row[1], row[2]) for row in self._db.execute(sql, args)}

    def mountpoint_of(self, repository: str, name: str, disk: int, volume: str, listing: int) -> str | None | bool:
        """The mount point an earlier restore point of `name` recorded for this very listing; False if none."""
        row = self._db.execute(
            "SELECT mountpoint FROM file_index WHERE repository = ? AND point_name = ? AND disk = ? AND volume = ? "
            "AND listing = ? ORDER BY point_created DESC LIMIT 1",
            (repository, name, disk, volume, listing),
        ).fetchone()
        return row[0] if row else False

    def find(self, repository: str, pattern: str, *, by_name: bool, name: str | None = None) -> list[FoundFile]:
        """Entries whose guest path (or, with by_name, last component) matches the GLOB `pattern`."""
        where = "e.name GLOB ?" if by_name else f"({_GUEST_PATH}) GLOB ?"
        sql = (
            f"SELECT i.restore_point, i.point_name, i.point_created, {_GUEST_PATH}, e.type, e.size, e.mtime_ns "
            f"FROM file_index i JOIN file_entries e ON e.listing = i.listing WHERE i.repository = ? AND {where}"
        )
        args: list = [repository, pattern]
        if name is not None:
            sql += " AND i.point_name = ?"
            args.append(name)
        return [FoundFile(*row) for row in self._db.execute(sql, args)]

    def forget_points(self, repository: str, keep: Iterable[str]) -> int:
        """Drop the index of restore points not in `keep` (forgotten ones), and listings nobody uses."""
        kept = set(keep)
        with self._lock, self._db:
            gone = [
                row[0]
                for row in self._db.execute(
                    "SELECT DISTINCT restore_point FROM file_index WHERE repository = ?", (repository,)
                )
                if row[0] not in kept
            ]
            for point in gone:
                self._db.execute(
                    "DELETE FROM file_index WHERE repository = ? AND restore_point = ?", (repository, point)
                )
            if gone:
                orphans = [
                    row[0]
                    for row in self._db.execute(
                        "SELECT id FROM file_listings l WHERE repository = ? AND NOT EXISTS "
                        "(SELECT 1 FROM file_index i WHERE i.listing = l.id)",
                        (repository,),
                    )
                ]
                for listing in orphans:
                    self._db.execute("DELETE FROM file_entries WHERE listing = ?", (listing,))
                    self._db.execute("DELETE FROM file_listings WHERE id = ?", (listing,))
            return len(gone)


def split_secrets(config: dict) -> tuple[dict, dict]:
    """(the writer settings without secrets, the secrets)."""
    public = {k: v for k, v in config.items() if k not in SECRET_SETTINGS}
    secret = {k: v for k, v in config.items() if k in SECRET_SETTINGS and v is not None}
    return public, secret
