"""qemu-storage-daemon serving a cycle's new qcow2 files as writable NBD exports on a unix socket.

Why: a replica cycle writes changed blocks into qcow2 overlays, and only QEMU's block layer
writes qcow2. The daemon is a child that dies with its parent (PR_SET_PDEATHSIG), so a receiver
killed with -9 leaves no process holding the replica's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from surepoint.replica.errors import ReplicaWriteError
from surepoint.vm.errors import NbdError
from surepoint.vm.nbd import NbdClient

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class StorageDaemon:
    """One qemu-storage-daemon exporting `images` ({export name: qcow2 path}) read-write."""

    def __init__(self, images: dict[str, str]) -> None:
        self.images = dict(images)
        self.workdir = tempfile.mkdtemp(prefix="surepoint-replica-")
        self.socket_path = os.path.join(self.workdir, "nbd.sock")
        self.log_path = os.path.join(self.workdir, "qsd.log")
        self.clients: dict[str, NbdClient] = {}
        argv = ["qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={self.socket_path}"]
        for i, (name, path) in enumerate(self.images.items()):
            node = f"img{i}"
            blockdev = {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}}
            argv += ["--blockdev", json.dumps(blockdev)]
            argv += ["--export", f"type=nbd,id=exp{i},node-name={node},name={name},writable=on"]
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent
                )
        except FileNotFoundError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise ReplicaWriteError("qemu-storage-daemon is not installed (package qemu-system-common)") from None
        try:
            self._wait_ready()
            for name in self.images:
                self.clients[name] = NbdClient.unix(self.socket_path, name, timeout=600)
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-3:]) or "nothing logged"
        except OSError:
            return "nothing logged"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.01
        while True:
            if self.proc.poll() is not None:
                raise ReplicaWriteError(f"qemu-storage-daemon exited with {self.proc.returncode}: {self._log_tail()}")
            if os.path.exists(self.socket_path):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self.socket_path)
                        return
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise ReplicaWriteError("qemu-storage-daemon did not start in time")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def client(self, name: str) -> NbdClient:
        return self.clients[name]

    def flush(self) -> None:
        """Every write durable (qcow2 metadata included): NBD flush on every export."""
        try:
            for client in self.clients.values():
                client.flush()
        except NbdError as exc:
            raise ReplicaWriteError(f"flushing the replica's disks failed: {exc}") from None

    def stop(self) -> None:
        """Close the connections and end the daemon (SIGTERM: it closes its images cleanly)."""
        for client in self.clients.values():
            with contextlib.suppress(NbdError, OSError):
                client.close()
        self.clients = {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
