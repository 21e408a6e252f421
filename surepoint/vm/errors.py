"""Errors met while talking to a running VM: its QMP monitor, its guest agent, its disks over NBD."""

from __future__ import annotations

from surepoint.errors import SourceError, SurepointError


class VmError(SurepointError):
    """Base of every error raised by surepoint.vm."""


class QmpError(VmError):
    """The QMP monitor could not be reached, or the connection broke."""


class QmpTimeout(QmpError):
    """QEMU did not answer a QMP command in time."""


class QmpCommandError(QmpError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class GuestAgentError(VmError):
    """Base of the errors of the qemu-guest-agent client."""


class GuestAgentUnavailable(GuestAgentError):
    """No guest agent answers: the socket is missing, or nothing in the guest listens on the port."""


class GuestAgentTimeout(GuestAgentError):
    """The guest agent did not answer a command in time (it may be hung, or the command slow)."""


class GuestAgentCommandError(GuestAgentError):
    """The guest agent answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class GuestCommandFailed(GuestAgentError):
    """A program run in the guest with guest-exec exited non-zero (or died on a signal)."""

    def __init__(self, argv: list[str], exitcode: int | None, signal: int | None, stderr: bytes) -> None:
        how = f"exit code {exitcode}" if signal is None else f"signal {signal}"
        tail = stderr.decode(errors="replace").strip()[-500:]
        super().__init__(f"guest command {argv!r} failed with {how}" + (f": {tail}" if tail else ""))
        self.argv = argv
        self.exitcode = exitcode
        self.signal = signal
        self.stderr = stderr


class NbdError(SourceError, VmError):
    """Reading a disk over NBD failed: connection, handshake or a request."""


class NbdProtocolError(NbdError):
    """The NBD server sent something this client does not accept."""


class NbdServerError(NbdError):
    """The NBD server refused an option or failed a request (with an NBD error number)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class FleeceError(VmError):
    """The point-in-time view of a VM's disks could not be set up."""
