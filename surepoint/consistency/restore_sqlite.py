"""SQLite restore rules: the database file comes back with the journal it had at the snapshot, never with
the -wal/-shm of the newer file it replaces (SQLite would apply that newer WAL to the older database).

pre_restore checks that no connection holds a lock on the target; restore writes each file under a
temporary name and renames it into place after removing the target's -wal, -shm and -journal;
post_restore folds a restored WAL into the database and runs PRAGMA integrity_check.
"""

from __future__ import annotations

import os
import shutil

from surepoint.consistency.restore import RestoreRequest, RestoreWriter, TargetInUse, find_in_point
from surepoint.consistency.runner import CommandFailed

SIDE_FILES = ("-wal", "-shm", "-journal")


class SqliteRestore(RestoreWriter):
    name = "sqlite"

    def _targets(self, request: RestoreRequest) -> dict[str, str]:
        databases = request.metadata.get("databases") or []
        if not databases:
            raise CommandFailed("the restore point lists no SQLite database")
        if os.path.isdir(request.target):
            return {db: os.path.join(request.target, os.path.basename(db)) for db in databases}
        if len(databases) > 1:
            raise TargetInUse(f"the restore point holds {len(databases)} databases: give a directory to restore into")
        return {databases[0]: request.target}

    def pre_restore(self, request: RestoreRequest) -> str:
        self.plan = {}
        for db, target in self._targets(request).items():
            self.plan[find_in_point(request.roots, db, "")] = target
            if os.path.exists(target):
                if not request.overwrite:
                    raise TargetInUse(f"{target} exists; allow overwriting to replace it")
                # BEGIN EXCLUSIVE waits for no one: it fails at once if any connection reads or writes.
                probe = self.runner.run(
                    ["sqlite3", "-batch", target, ".timeout 2000", "BEGIN EXCLUSIVE;", "ROLLBACK;"], timeout=30
                )
                if probe.returncode != 0 or "locked" in probe.stderr + probe.stdout:
                    raise CommandFailed(f"{target} is in use (locked by another connection): stop its application")
        return f"{len(self.plan)} database(s): " + ", ".join(f"{s} -> {t}" for s, t in self.plan.items())

    def restore(self, request: RestoreRequest) -> str:
        notes = []
        for source, target in self.plan.items():
            removed = []
            for suffix in SIDE_FILES:
                if os.path.exists(target + suffix):
                    os.unlink(target + suffix)
                    removed.append(suffix)
            brought = []
            for suffix in ("", "-wal", "-journal"):
                if os.path.exists(source + suffix) and (suffix == "" or os.path.getsize(source + suffix) > 0):
                    tmp = f"{target}{suffix}.surepoint-restore"
                    shutil.copy2(source + suffix, tmp)
                    st = os.stat(source + suffix)
                    os.chown(tmp, st.st_uid, st.st_gid)
                    os.replace(tmp, target + suffix)
                    if suffix:
                        brought.append(suffix)
            note = f"{target} restored"
            if brought:
                note += f" with its {', '.join(brought)} from the restore point"
            if removed:
                note += f"; removed the newer {', '.join(removed)}"
            notes.append(note)
        return "; ".join(notes)

    def post_restore(self, request: RestoreRequest) -> str:
        notes = []
        for target in self.plan.values():
            result = self.runner.run(
                ["sqlite3", "-batch", target, "PRAGMA integrity_check;", "PRAGMA wal_checkpoint(TRUNCATE);",
                 "SELECT count(*) FROM sqlite_master WHERE type='table';"],
                timeout=request.timeout,
            ).check()  # fmt: skip
            lines = result.stdout.split()
            if not lines or lines[0] != "ok":
                raise CommandFailed(f"{target} fails its integrity check: {' '.join(lines[:3])}")
            notes.append(f"{target}: integrity ok, {lines[-1]} tables")
        return "; ".join(notes)
