"""YARA rules run over a tree of files: one mounted filesystem of a restore point.

The tree comes from a guest and is not trusted: the walk never follows a symlink (a link to
/etc/shadow would otherwise scan the host's file), never leaves the filesystem it started on,
and scans regular files only. Names are kept as the guest wrote them; whoever prints them passes
them through surepoint.text.printable.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import yara

from surepoint.errors import InvalidArgument

MAX_FILE_SIZE = 1 << 30  # larger files are listed as skipped, not scanned
FILE_TIMEOUT = 120  # seconds YARA may spend on one file
THREADS = 4  # YARA releases the GIL while it scans; reads through the mount overlap


class BadRules(InvalidArgument):
    """The rules file is missing, unreadable or does not compile."""


@dataclass(frozen=True)
class Rules:
    path: str
    sha256: str
    compiled: yara.Rules


def load_rules(path: str) -> Rules:
    """Compile a YARA rules file; a clear error when it cannot be read or does not compile."""
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise BadRules(f"cannot read YARA rules {path}: {exc.strerror}") from None
    try:
        compiled = yara.compile(filepath=path)
    except yara.SyntaxError as exc:
        raise BadRules(f"YARA rules {path} do not compile: {exc}") from None
    except yara.Error as exc:
        raise BadRules(f"YARA rules {path} cannot be used: {exc}") from None
    return Rules(path, hashlib.sha256(source).hexdigest(), compiled)


@dataclass
class FileMatch:
    path: str  # guest path
    rules: list[str]

    def to_json(self) -> dict:
        return {"path": self.path, "rules": self.rules}


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    matches: list[FileMatch] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (guest path, why): too large
    errors: list[tuple[str, str]] = field(default_factory=list)  # (guest path, error): not scanned

    @property
    def outcome(self) -> str:
        """match: a rule matched; incomplete: no match, but some files could not be scanned; clean."""
        if self.matches:
            return "match"
        return "incomplete" if self.errors else "clean"

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome,
            "files": self.files,
            "bytes": self.bytes,
            "matches": [m.to_json() for m in self.matches],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "errors": [{"path": p, "error": e} for p, e in self.errors],
        }


def guest_path(prefix: str, relative: str) -> str:
    """`relative` (from the filesystem's root) under the guest mount point `prefix` ("/" or "/boot")."""
    relative = relative.strip("/")
    if not relative:
        return prefix
    return f"{prefix.rstrip('/')}/{relative}"


def scan_tree(
    rules: Rules,
    root: str,
    prefix: str,
    report: ScanReport,
    *,
    max_file_size: int = MAX_FILE_SIZE,
    timeout: int = FILE_TIMEOUT,
    on_match: Callable[[FileMatch], None] | None = None,
) -> None:
    """Scan every regular file under `root`; matches and problems are added to `report` with guest paths."""
    device = os.lstat(root).st_dev

    def one(item: tuple[str, str]) -> tuple[str, list[str] | None, str | None]:
        full, where = item
        try:
            found = rules.compiled.match(full, timeout=timeout)
        except yara.TimeoutError:
            return where, None, f"scan took longer than {timeout} s"
        except yara.Error as exc:
            return where, None, str(exc)
        return where, sorted({m.rule for m in found}), None

    def files():
        def failed(exc: OSError) -> None:
            rel = os.path.relpath(exc.filename, root) if exc.filename else "?"
            report.errors.append((guest_path(prefix, rel), exc.strerror or str(exc)))

        for dirpath, dirnames, filenames in os.walk(root, onerror=failed, followlinks=False):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep = []
            for name in dirnames:
                try:
                    if os.lstat(os.path.join(dirpath, name)).st_dev == device:
                        keep.append(name)
                except OSError as exc:
                    report.errors.append((guest_path(prefix, os.path.join(rel_dir, name)), exc.strerror or str(exc)))
            dirnames[:] = sorted(keep)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                where = guest_path(prefix, os.path.join(rel_dir, name))
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    report.errors.append((where, exc.strerror or str(exc)))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinks, devices, sockets: nothing of the guest's data to read
                if st.st_size > max_file_size:
                    report.skipped.append((where, f"larger than {max_file_size} bytes"))
                    continue
                report.files += 1
                report.bytes += st.st_size
                yield full, where

    with ThreadPoolExecutor(THREADS) as pool:
        for where, matched, error in pool.map(one, files()):
            if error is not None:
                report.errors.append((where, error))
            elif matched:
                found = FileMatch(where, matched)
                report.matches.append(found)
                if on_match:
                    on_match(found)
