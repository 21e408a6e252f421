"""Helpers for the fault-injection tests: a `surepoint` runner per repository, disk images, damage and checks.

Every test gets its own repository and catalog (a `Repo` made from tmp_path) and runs the real console
script as a subprocess, so what is checked is what a user sees: exit codes, one error line, restored bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

SUREPOINT = shutil.which("surepoint") or os.path.join(sys.prefix, "bin", "surepoint")
PASSPHRASE = "fault injection passphrase"
CHUNK = 65536
MiB = 1 << 20

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"surepoint {' '.join(self.args)} -> {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class Repo:
    """One test repository with its own catalog; runs `surepoint` against it."""

    def __init__(
        self,
        base: Path,
        *,
        encryption: str = "aes-256-gcm",
        passphrase: str = PASSPHRASE,
        repo: Path | None = None,
        catalog: Path | None = None,
    ) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.path = repo or base / "repo"
        self.catalog = catalog or base / "catalog.sqlite"
        self.encryption = encryption
        self.passphrase = passphrase
        self.prefix: list[str] = []  # e.g. setpriv ... to run as another user

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUREPOINT_")}
        env.update(
            SUREPOINT_KNOWN_REPOSITORIES=os.environ.get(
                "SUREPOINT_KNOWN_REPOSITORIES", str(self.base / "known-repositories.json")
            ),
            SUREPOINT_REPO=str(self.path),
            SUREPOINT_PASSPHRASE=self.passphrase,
            SUREPOINT_CATALOG=str(self.catalog),
        )
        env.update(extra)
        return env

    def argv(self, args: Iterable[str]) -> list[str]:
        return [*self.prefix, SUREPOINT, *args]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Result:
        proc = subprocess.run(
            self.argv(args),
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        result = Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, str(result)
        return result

    def ok(self, *args: str, **kw) -> Result:
        result = self.run(*args, **kw)
        assert result.returncode == 0, str(result)
        return result

    def fails(self, *args: str, code: int, words: Iterable[str] = (), **kw) -> str:
        """Run a command that must fail with `code`; return its one error line (checked for `words`)."""
        result = self.run(*args, **kw)
        assert result.returncode == code, str(result)
        line = error_line(result)
        for word in words:
            assert word.lower() in line.lower(), f"{word!r} not in error line {line!r}\n{result}"
        return line

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(args),
            env=env or self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # common operations -------------------------------------------------------------------------

    def init(self, chunk_size: int = CHUNK) -> None:
        self.ok("init", "--encryption", self.encryption, "--chunk-size", str(chunk_size))

    def backup(self, image: Path, name: str | None = None) -> dict:
        args = ["backup", str(image), "--json"]
        if name:
            args += ["--name", name]
        return self.ok(*args).json()

    def points(self) -> list[dict]:
        return self.ok("list", "--json").json()["restore_points"]

    def point_ids(self) -> list[str]:
        return [p["id"] for p in self.points()]

    def restore_matches(self, point: str, expected_sha: str, target: Path | None = None) -> None:
        target = target or self.base / f"restored-{point.replace(':', '_')}-{time.monotonic_ns()}.img"
        self.ok("restore", point, "--to", str(target))
        assert sha256_file(target) == expected_sha, f"restore of {point} differs from its source"
        target.unlink()

    def verify_clean(self) -> dict:
        report = self.ok("verify", "--json").json()
        assert not report["damaged_manifests"] and report["damaged_chunks"] == 0, report
        assert all(p["state"] == "verified" for p in report["points"]), report
        return report

    # looking inside the repository (test oracle only) ------------------------------------------

    def open_api(self):
        from surepoint import storage
        from surepoint.repo.repository import Repository

        return Repository.open(storage.open(str(self.path)), lambda: self.passphrase)

    def chunk_names(self, point_id: str, disk: int = 0) -> list[str | None]:
        """Object name of the chunk at each chunk number of a disk (None for zero chunks)."""
        from surepoint.repo.chunks import ZERO_ID, chunk_object_name

        repo = self.open_api()
        point = repo.resolve(point_id)
        index = repo.load_index(point, disk)
        return [None if cid == ZERO_ID else chunk_object_name(cid) for cid in index.ids]

    def chunk_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / "chunks").rglob("*") if f.is_file())

    def locks(self) -> list[Path]:
        """Lock objects (not the temporary files they are written through)."""
        return sorted(p for p in (self.path / "locks").iterdir() if not p.name.endswith(".tmp"))


def error_line(result: Result) -> str:
    """The one `error:` line of a failed command; it must be the last thing on stderr, not wrapped."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line\n{result}"
    assert lines[-1] == errors[0], f"the error line is followed by more output (wrapped?)\n{result}"
    return errors[0]


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def make_image(path: Path, size: int, *, seed: int, random_share: float = 0.5, chunk: int = CHUNK) -> str:
    """A sparse image: seeded random chunks, a repeated block (deduplicates), zero-filled and hole chunks.

    Returns its sha256.
    """
    rng = random.Random(seed)
    repeated = rng.randbytes(chunk)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, chunk):
            length = min(chunk, size - offset)
            roll = rng.random()
            if roll < random_share:
                data = rng.randbytes(length)
            elif roll < random_share + (1 - random_share) / 3:
                data = repeated[:length]
            elif roll < random_share + 2 * (1 - random_share) / 3:
                data = bytes(length)  # allocated zeros
            else:
                continue  # hole
            f.seek(offset)
            f.write(data)
    return sha256_file(path)


def make_random_image(path: Path, size: int, *, seed: int) -> str:
    """An image of incompressible, non-repeating bytes (every chunk is new); returns its sha256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size, 8 * MiB):
            block = rng.randbytes(min(8 * MiB, size - f.tell()))
            f.write(block)
            h.update(block)
    return h.hexdigest()


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of a file (the middle one by default), in place."""
    size = path.stat().st_size
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def no_target_left(target: Path) -> None:
    """Neither the target nor any partial file named like it exists."""
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(target.name)]
    assert leftovers == [], f"restore left {leftovers} behind"


def temporary_files(repo: Repo) -> list[str]:
    """Leftovers of interrupted writes inside the repository."""
    return [str(p) for p in repo.path.rglob("*.tmp")]


def wait_for(predicate, timeout: float, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
