"""Put files from this host into a running guest: a restore inside a VM.

The files (a data directory, database files, logs to replay) are packed on the host into one tar
archive (holes kept, numeric owners: they are the guest's own users, read from its own disk) and
unpacked in the guest by the guest's tar. Two ways in:

* **channel** (the default): a virtio-serial port is hot-plugged for the time of the copy
  (`chardev-add` of a private unix socket, `device_add virtserialport` on the guest's
  virtio-serial bus, which every VM with a guest agent has), the guest reads
  `/dev/virtio-ports/<name>` with `head -c SIZE | tar -x`, and the host writes the archive into the
  socket. The host keeps its end open until the guest's tar has ended: QEMU drops what is still
  queued when the host side closes, so the size, not the end of the stream, ends the guest's read.
  Measured under TCG on 2 shared cores: about 20 MiB/s (the agent path below: about 4 MiB/s).
* **agent**: when the VM cannot take the port (no virtio-serial bus, QMP refused), the archive is
  written through `guest-file-write` to a temporary file beside the target, then unpacked there.

Nothing from the host is pasted into a guest shell: paths and sizes reach the fixed scripts as
arguments.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from surepoint.consistency.runner import CommandFailed, one_line
from surepoint.text import printable
from surepoint.vm.errors import GuestAgentError, VmError
from surepoint.vm.guest_agent import GuestAgent

PORT_PREFIX = "org.surepoint.restore."
SEND_CHUNK = 1 << 20
PORT_WAIT = 30.0  # seconds for the guest's udev to show the new port
# $1 = size, $2 = port device, $3 = directory to unpack into
UNPACK_FROM_PORT = 'head -c "$1" "$2" | tar -x -p --numeric-owner -f - -C "$3"'
UNPACK_FROM_FILE = 'tar -x -p --numeric-owner -f "$1" -C "$2"; status=$?; rm -f -- "$1"; exit $status'


@dataclass
class Transfer:
    bytes: int
    seconds: float
    transport: str  # channel | agent

    def describe(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-6) / 2**20
        return f"{self.bytes / 2**20:.1f} MiB through the {self.transport} in {self.seconds:.1f} s ({rate:.1f} MiB/s)"


def pack(source_dir: str, names: list[str], archive: str, timeout: float) -> int:
    """A tar archive of `names` (relative to source_dir; ["."] for all of it); its size."""
    argv = ["tar", "--sparse", "--numeric-owner", "-C", source_dir, "-cf", archive, "--", *names]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise CommandFailed(f"cannot read {source_dir} in the restore point: {one_line(proc.stderr)}")
    return os.path.getsize(archive)


class GuestTransfer:
    """Copies files into one guest: `send(source_dir, names, guest_dir)`.

    `open_qmp` gives a QMP connection to the VM (None: only the agent path), `runner` is the
    GuestRunner whose agent runs the guest side.
    """

    def __init__(self, runner, open_qmp: Callable[[], object] | None, timeout: float = 1800.0) -> None:
        self.runner = runner
        self.open_qmp = open_qmp
        self.timeout = timeout
        self.transfers: list[Transfer] = []
        self._ended: set[int] = set()  # guest pids whose good exit was seen already

    @property
    def agent(self) -> GuestAgent:
        return self.runner.agent

    def send(self, source_dir: str, names: list[str], guest_dir: str) -> Transfer:
        work = tempfile.mkdtemp(prefix="surepoint-transfer-")
        try:
            os.chmod(work, 0o700)
            archive = os.path.join(work, "data.tar")
            size = pack(source_dir, names, archive, self.timeout)
            started = time.monotonic()
            transport = "channel"
            try:
                self._send_channel(archive, size, guest_dir, work)
            except _NoChannel:
                transport = "agent"
                self._send_agent(archive, guest_dir)
            result = Transfer(size, time.monotonic() - started, transport)
            self.transfers.append(result)
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # the hot-plugged virtio-serial port ------------------------------------------------------

    def _send_channel(self, archive: str, size: int, guest_dir: str, work: str) -> None:
        with self._port(work) as (sock, port):
            try:
                with self.runner.lock:
                    pid = self.agent.exec_start(["/bin/sh", "-c", UNPACK_FROM_PORT, "sh", str(size), port, guest_dir])
                deadline = time.monotonic() + self.timeout
                with open(archive, "rb") as f:
                    while block := f.read(SEND_CHUNK):
                        view = memoryview(block)
                        while view:
                            try:
                                sent = sock.send(view)
                            except TimeoutError:
                                if self._check_running(pid, deadline):  # the guest stopped reading: why?
                                    raise CommandFailed("unpacking in the guest ended before the archive did") from None
                                continue
                            view = view[sent:]
                self._wait(pid, deadline)
            except OSError as exc:
                raise CommandFailed(f"copy into the guest through its port: {exc}") from None

    def receive(self, files: list[tuple[str, int]]) -> Iterator[tuple[str, bytes]]:
        """(path, contents) of each guest file of the given size, one after the other, through one port
        (through the agent's guest-file-read when the VM cannot take a port). The files must not change."""
        work = tempfile.mkdtemp(prefix="surepoint-transfer-")
        try:
            os.chmod(work, 0o700)
            try:
                with self._port(work) as (sock, port):
                    for path, size in files:
                        yield path, self._receive_one(sock, port, path, size)
                return
            except _NoChannel:
                pass
            for path, _size in files:
                try:
                    with self.runner.lock:
                        yield path, self.agent.read_file(path)
                except GuestAgentError as exc:
                    raise CommandFailed(f"cannot read {path} in the guest: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _receive_one(self, sock: socket.socket, port: str, path: str, size: int) -> bytes:
        with self.runner.lock:
            pid = self.agent.exec_start(["/bin/sh", "-c", 'cat -- "$1" > "$2"', "sh", path, port])
        deadline = time.monotonic() + self.timeout
        parts, got, quiet_after_exit = [], 0, 0
        try:
            while got < size:
                try:
                    data = sock.recv(min(SEND_CHUNK, size - got))
                except TimeoutError:
                    if self._check_running(pid, deadline):
                        quiet_after_exit += 1  # cat is done: what it wrote may still be on its way, a while
                        if quiet_after_exit > 2:
                            raise CommandFailed(f"reading {path} from the guest: {got} of {size} bytes came") from None
                    continue
                if not data:
                    raise CommandFailed(f"reading {path} from the guest: the port closed after {got} bytes")
                parts.append(data)
                got += len(data)
        except OSError as exc:
            raise CommandFailed(f"reading {path} from the guest through its port: {exc}") from None
        self._wait(pid, deadline)
        return b"".join(parts)

    @contextlib.contextmanager
    def _port(self, work: str) -> Iterator[tuple[socket.socket, str]]:
        """A virtio-serial port hot-plugged into the guest for the block: (connected socket, guest device)."""
        if self.open_qmp is None:
            raise _NoChannel()
        tag = secrets.token_hex(4)
        chardev, device, name = f"sprestore{tag}", f"sprestore{tag}-port", PORT_PREFIX + tag
        path = os.path.join(work, "port.sock")
        try:
            qmp = self.open_qmp()
        except (VmError, OSError):
            raise _NoChannel() from None
        with qmp:
            backend = {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": path}}, "server": True,
                                                  "wait": False}}  # fmt: skip
            try:
                qmp.execute_args("chardev-add", {"id": chardev, "backend": backend})
            except VmError:
                raise _NoChannel() from None
            try:
                try:
                    qmp.execute_args("device_add", {"driver": "virtserialport", "chardev": chardev, "name": name,
                                                    "id": device})  # fmt: skip
                except VmError:
                    raise _NoChannel() from None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                    sock.settimeout(5.0)
                    port = f"/dev/virtio-ports/{name}"
                    deadline = time.monotonic() + PORT_WAIT
                    while not self.runner.exists(port):
                        if time.monotonic() > deadline:
                            raise CommandFailed(
                                f"the guest did not show the hot-plugged port {port} within {PORT_WAIT:.0f} s"
                            )
                        time.sleep(0.2)
                    yield sock, port
                except OSError as exc:
                    raise CommandFailed(f"the port hot-plugged into the guest: {exc}") from None
                finally:
                    sock.close()
                    with contextlib.suppress(VmError):
                        qmp.execute_args("device_del", {"id": device})
                    _wait_gone(qmp, device)
            finally:
                for _ in range(20):
                    try:
                        qmp.execute_args("chardev-remove", {"id": chardev})
                        break
                    except VmError:
                        time.sleep(0.25)  # still in use by the port being unplugged

    def _check_running(self, pid: int, deadline: float) -> bool:
        """While the guest side of a copy seems stuck: an error if it failed or took too long; True if it
        ended well (a guest exec's exit is reported once: the caller must not ask again)."""
        if time.monotonic() > deadline:
            raise CommandFailed(f"the copy with the guest did not end within {self.timeout:.0f} s")
        with self.runner.lock:
            status = self.agent.exec_status(pid)
        if status.get("exited"):
            if status.get("exitcode") == 0 and status.get("signal") is None:
                self._ended.add(pid)
                return True
            raise CommandFailed(f"the copy in the guest failed: {_said(status)}")
        return False

    def _wait(self, pid: int, deadline: float) -> None:
        if pid in self._ended:
            return
        while True:
            with self.runner.lock:
                status = self.agent.exec_status(pid)
            if status.get("exited"):
                if status.get("exitcode") != 0 or status.get("signal") is not None:
                    raise CommandFailed(f"the copy in the guest failed: {_said(status)}")
                return
            if time.monotonic() > deadline:
                raise CommandFailed(f"the copy in the guest did not end within {self.timeout:.0f} s")
            time.sleep(0.1)

    # the agent's file calls ----------------------------------------------------------------------

    def _send_agent(self, archive: str, guest_dir: str) -> None:
        staged = os.path.join(guest_dir, f".surepoint-restore-{secrets.token_hex(4)}.tar")
        # made private first: a file guest-file-open creates is readable and writable by every
        # user of the guest (qemu-ga sets 0666), and this one holds the restored data
        self.runner.run(["install", "-m", "600", "/dev/null", staged], timeout=60).check()
        try:
            with self.runner.lock:
                handle = self.agent.file_open(staged, "r+b")
                try:
                    with open(archive, "rb") as f:
                        while block := f.read(4 << 20):
                            view = memoryview(block)
                            while view:
                                written = self.agent.file_write(handle, bytes(view))
                                if written <= 0:
                                    raise CommandFailed(f"writing {staged} in the guest wrote nothing (disk full?)")
                                view = view[written:]
                finally:
                    self.agent.file_close(handle)
        except GuestAgentError as exc:
            self.runner.run(["rm", "-f", "--", staged], timeout=60)
            raise CommandFailed(f"copy into the guest through its agent: {exc}") from None
        self.runner.run(["/bin/sh", "-c", UNPACK_FROM_FILE, "sh", staged, guest_dir], timeout=self.timeout).check()


class _NoChannel(Exception):
    """The VM cannot take a hot-plugged port: use the agent."""


def _said(status: dict) -> str:
    import base64

    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
    code = status.get("exitcode")
    return printable(one_line(err)[-300:]) or f"exit status {code}"


def _wait_gone(qmp, device: str, timeout: float = 10.0) -> None:
    """Until QEMU has removed the port (virtio-serial ports unplug without the guest's consent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            qmp.execute_args("qom-get", {"path": f"/machine/peripheral/{device}", "property": "type"})
        except VmError:
            return
        time.sleep(0.1)
