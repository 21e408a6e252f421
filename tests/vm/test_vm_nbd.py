"""The userspace NBD client against qemu-nbd serving image files (no VM needed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.repo.extents import Extent
from surepoint.sources import FileDiskSource
from surepoint.vm.errors import NbdError, NbdServerError
from surepoint.vm.nbd import BASE_ALLOCATION, STATE_HOLE, STATE_ZERO, NbdClient, NbdDiskSource

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd (qemu-utils) is missing")

MiB = 1 << 20
SIZE = 80 * MiB
# (offset, length) of the data written into an otherwise sparse image; one run is > 32 MiB so a
# read of it must be split to the server's max block size.
WRITES = [(0, 1 * MiB), (10 * MiB, 3 * MiB), (30 * MiB, 40 * MiB), (79 * MiB, 64 * 1024)]


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in WRITES:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_connectable(address: str | tuple[str, int], proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family) as s:
            try:
                s.connect(address)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError("qemu-nbd did not start listening")


@contextlib.contextmanager
def serve(args: list[str], address: str | tuple[str, int]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--read-only", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_connectable(address, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def unix_server(image: Path, tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "nbd.sock")
    with serve(["--format=raw", "--export-name=disk", f"--socket={sock}", str(image)], sock):
        yield sock


def test_read_matches_file_over_unix(unix_server: str, image: Path) -> None:
    expected = image.read_bytes()
    with NbdClient.unix(unix_server, "disk") as client:
        assert client.size == SIZE
        assert client.structured
        assert client.export.read_only
        assert client.export.max_block == 32 * MiB
        assert client.read(0, 4096) == expected[:4096]
        # spans data and hole, unaligned
        assert client.read(MiB - 1000, 5000) == expected[MiB - 1000 : MiB + 4000]
        # 40 MiB of data: larger than the server's max block size, so it is split
        assert client.read(30 * MiB, 40 * MiB) == expected[30 * MiB : 70 * MiB]
        assert client.read(0, SIZE) == expected


def test_block_status_finds_holes(unix_server: str, image: Path) -> None:
    with NbdClient.unix(unix_server, "disk", [BASE_ALLOCATION]) as client:
        statuses = client.block_status_all()[BASE_ALLOCATION]
    assert statuses[0].extent.offset == 0
    assert sum(s.extent.length for s in statuses) == SIZE
    holes = [s.extent for s in statuses if s.flags & STATE_HOLE]
    assert holes, "a sparse image must show holes"
    assert all(s.flags & STATE_ZERO for s in statuses if s.flags & STATE_HOLE)

    source = NbdDiskSource(unix_server, "disk")
    try:
        allocated = source.allocated()
        assert source.changed() is None
        assert source.size == SIZE
    finally:
        source.close()
    oracle = FileDiskSource(str(image))
    try:
        assert allocated == oracle.allocated()
    finally:
        oracle.close()
    assert sum(e.length for e in allocated) == sum(length for _, length in WRITES)
    assert Extent(10 * MiB, 3 * MiB) in allocated


def test_tcp(image: Path) -> None:
    port = free_port()
    expected = image.read_bytes()
    args = ["--format=raw", "--export-name=disk", "--bind=127.0.0.1", f"--port={port}", str(image)]
    with serve(args, ("127.0.0.1", port)), NbdClient.tcp("127.0.0.1", port, "disk", [BASE_ALLOCATION]) as client:
        assert client.read(10 * MiB, 3 * MiB) == expected[10 * MiB : 13 * MiB]
        status = client.block_status(0, SIZE)[BASE_ALLOCATION]
        assert status[0].extent == Extent(0, MiB) and not status[0].flags & STATE_ZERO


def test_errors(unix_server: str, tmp_path: Path) -> None:
    with pytest.raises(NbdServerError, match="unknown export"):
        NbdClient.unix(unix_server, "no-such-export")
    with pytest.raises(NbdServerError, match="qemu:dirty-bitmap:nope"):
        NbdDiskSource(unix_server, "disk", bitmap="nope")
    with pytest.raises(NbdError, match="cannot connect"):
        NbdClient.unix(str(tmp_path / "absent.sock"), "disk")
    with NbdClient.unix(unix_server, "disk") as client:
        with pytest.raises(NbdError, match="outside export"):
            client.read(SIZE - 10, 20)
        assert client.read(SIZE - 10, 10) == bytes(10)  # the connection is still usable


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing")
def test_dirty_bitmap_context(tmp_path: Path) -> None:
    """A qcow2 with a persistent dirty bitmap that recorded one write: changed() finds just that."""
    img = str(tmp_path / "disk.qcow2")
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(64 * MiB))
    run("qemu-io", "-c", "write -P 0x11 0 1M", img)  # before the bitmap: not dirty
    run("qemu-img", "bitmap", "--add", img, "since-full")
    run("qemu-io", "-c", "write -P 0xab 5M 2M", img)
    run("qemu-img", "bitmap", "--disable", img, "since-full")
    sock = str(tmp_path / "nbd.sock")
    with serve(["--format=qcow2", "--export-name=vda", "--bitmap=since-full", f"--socket={sock}", img], sock):
        source = NbdDiskSource(sock, "vda", bitmap="since-full")
        try:
            assert source.changed() == [Extent(5 * MiB, 2 * MiB)]
            assert source.allocated() == [Extent(0, MiB), Extent(5 * MiB, 2 * MiB)]
            assert source.read(5 * MiB, 4096) == b"\xab" * 4096
            assert source.read(0, 16) == b"\x11" * 16
        finally:
            source.close()
