"""Booting a VM with QEMU and waiting until its guest agent answers: how restore, instant recovery
and the recovery lab know a VM is up."""

from __future__ import annotations

import os
import subprocess
import time

from surepoint.errors import TargetError
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent


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
