"""Shared fixtures: a `surepoint` command runner with its own repository and catalog, and disk images."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.servers.seaweedfs", "tests.remote.sshd"]  # shared real servers

SUREPOINT = shutil.which("surepoint") or os.path.join(os.path.dirname(sys.executable), "surepoint")

# The tests never touch this machine's own ~/.config/surepoint: each run gets a known-repositories file
# of its own. (A shared one remembers repositories of earlier runs at the same temporary paths, and
# rightly refuses a new repository there as a forged config.)
_KNOWN_DIR = tempfile.mkdtemp(prefix="surepoint-tests-")
os.environ["SUREPOINT_KNOWN_REPOSITORIES"] = os.path.join(_KNOWN_DIR, "known-repositories.json")
atexit.register(shutil.rmtree, _KNOWN_DIR, ignore_errors=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class Cli:
    """Runs the real `surepoint` command against one test repository."""

    def __init__(self, tmp_path: Path, passphrase: str = "correct horse") -> None:
        self.repo = tmp_path / "repo"
        self.env = dict(os.environ)
        self.env.update(
            SUREPOINT_REPO=str(self.repo),
            SUREPOINT_PASSPHRASE=passphrase,
            SUREPOINT_CATALOG=str(tmp_path / "catalog.sqlite"),
            SUREPOINT_KNOWN_REPOSITORIES=str(tmp_path / "known-repositories.json"),
        )

    def run(self, *args: str, env: dict | None = None, check: bool = False, timeout: float = 300) -> Result:
        proc = subprocess.run(
            [SUREPOINT, *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"surepoint {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        assert "Traceback" not in proc.stderr, proc.stderr
        return result

    def points(self) -> list[dict]:
        return self.run("list", "--json", check=True).json()["restore_points"]


@pytest.fixture
def cli(request, tmp_path: Path) -> Cli:
    """A runner on a local repository; tests marked `s3` run a second time on an S3 bucket (SeaweedFS)."""
    runner = Cli(tmp_path)
    if getattr(request, "param", "local") == "s3":
        from tests.servers.seaweedfs import use_s3

        use_s3(runner, request.getfixturevalue("seaweedfs"), tmp_path)
    return runner


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "s3: also run the test with its `cli` or `backend` on an S3 repository (SeaweedFS)"
    )


def pytest_generate_tests(metafunc) -> None:
    if not metafunc.definition.get_closest_marker("s3"):
        return
    if "cli" in metafunc.fixturenames:
        metafunc.parametrize("cli", ["local", "s3"], indirect=True)
    elif "backend" in metafunc.fixturenames:  # the in-process engine tests (tests/repo/conftest.py)
        metafunc.parametrize("backend", ["memory", "s3"], indirect=True)


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_image(path: Path, size: int, *, seed: int = 0, regions: int = 8, region_size: int = 1 << 20) -> Path:
    """A sparse image with random, repeated and text regions at seeded offsets; the rest is a hole."""
    rng = random.Random(seed)
    repeated = rng.randbytes(region_size)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(regions):
            offset = rng.randrange(0, max(1, size - region_size)) & ~4095
            kind = i % 3
            if kind == 0:
                data = rng.randbytes(region_size)
            elif kind == 1:
                data = repeated
            else:
                data = (b"surepoint log line %d\n" % i) * (region_size // 24)
            f.seek(offset)
            f.write(data[:region_size])
    return path


def change_image(path: Path, *, seed: int, writes: int = 4, length: int = 8192) -> None:
    """Overwrite a few small ranges of an image with new random bytes."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(writes):
            f.seek(rng.randrange(0, size - length))
            f.write(rng.randbytes(length))
