"""Booting a VM with QEMU and waiting until its guest agent answers: how restore, instant recovery
and the recovery lab know a VM is up; and stopping it again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable

from surepoint.errors import TargetError
from surepoint.processes import same_process
from surepoint.vm.errors import GuestAgentError, QmpError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.qmp import QmpConnection

STOP_TIMEOUT = 20.0  # seconds QEMU gets to quit before it is killed


def start_qemu(argv: list[str], log_path: str) -> subprocess.Popen:
    """Start QEMU in a session of its own (it outlives the command), its output appended to `log_path`."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)


def log_tail(path: str, lines: int = 5) -> str:
    """The last lines of a QEMU log on one line, for an error message."""
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:]) or "nothing logged"
    except OSError:
        return "nothing logged"


def wait_for_guest_agent(
    proc: subprocess.Popen, agent_socket: str, timeout: float, *, log_path: str, interval: float = 0.5
) -> float:
    """Wait until the guest agent on `agent_socket` answers a ping; the seconds waited.

    TargetError (with the end of the QEMU log) when QEMU exits first, or when `timeout` passes.
    """
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"QEMU exited with {proc.returncode} while booting: {log_tail(log_path)}")
        if os.path.exists(agent_socket):
            try:
                with GuestAgent(agent_socket, timeout=2.0, sync_timeout=1.0) as agent:
                    agent.ping()
                return time.monotonic() - started
            except GuestAgentError:
                pass
        time.sleep(interval)
    raise TargetError(f"the VM did not answer on its guest agent within {timeout:.0f} s")


def wait_gone(pid: int | None, pid_start: int | None, timeout: float) -> bool:
    """Wait until the process is gone (reaping it when it is a child); False at the timeout."""
    deadline = time.monotonic() + timeout
    while same_process(pid, pid_start):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # type: ignore[arg-type]
    return True


def stop_qemu(
    qmp_path: str | None,
    pid: int | None,
    pid_start: int | None,
    timeout: float = STOP_TIMEOUT,
    say: Callable[[str], None] = lambda m: None,
    left: str = "",
) -> None:
    """QMP quit (the guest is cut off as by a power cut), SIGKILL if QEMU is still there after `timeout`.

    TargetError if even SIGKILL did not end it; `left` says what that leaves in place.
    """
    if not same_process(pid, pid_start):
        return
    if qmp_path:
        # EOFError: QmpConnection.close() lets it through when QEMU closed the socket on quit
        with contextlib.suppress(QmpError, OSError, EOFError), QmpConnection(qmp_path, timeout=10) as qmp:
            qmp.execute("quit")
    if wait_gone(pid, pid_start, timeout):
        return
    say(f"QEMU (pid {pid}) did not quit: killing it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
    if not wait_gone(pid, pid_start, 10):
        raise TargetError(f"cannot stop QEMU (pid {pid}){'; ' + left if left else ''}")
