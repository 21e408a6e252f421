"""Errors a user can cause or meet, each with the exit code the command line gives it.

Every class carries its exit code; only the command line's `main()` turns an error into an exit
code and a line on stderr. The message says what went wrong in the terms of the thing that failed
(a repository, a restore point, a file); advice about which command or flag to use next belongs to
the command line, which may put it in `hint` (printed after the message). Core code never tells
the user to run a `surepoint ...` command.

Exit codes: 1 the job could not be done (missing repository, wrong passphrase, storage error...),
2 the request itself is wrong (a bad argument, a bad job/lab/inventory file, a target that is in
use) and running it again unchanged cannot help, 3 stored data is damaged.
"""

from __future__ import annotations


class SurepointError(Exception):
    """Base of every error that the CLI reports as one clear line instead of a traceback."""

    exit_code = 1

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(SurepointError):
    """The command line was used wrongly (a missing or contradictory option). Raised by the CLI only."""

    exit_code = 2


# -- the request is wrong (exit 2) -------------------------------------------------------------


class InvalidArgument(SurepointError):
    """A value given to the core is not acceptable (a name, a path, a size, a choice)."""

    exit_code = 2


class ConfigError(InvalidArgument):
    """A job, lab or inventory file cannot be read or says something invalid (the message names the file)."""


class UnsupportedLocation(InvalidArgument):
    """A repository location whose scheme no storage backend handles."""


class RepositoryExists(InvalidArgument):
    """A new repository was asked for where one (or other data) already is."""


class InvalidRepositoryConfig(InvalidArgument):
    """Settings for a new repository are not acceptable (chunk size, cipher, empty passphrase)."""


class NotEncrypted(InvalidArgument):
    """An operation on keys or passphrases was asked of a repository that has none."""


class AmbiguousReference(InvalidArgument):
    """A restore-point reference (an id prefix) matches more than one restore point."""


class NoSuchDisk(InvalidArgument):
    """A restore point has no disk of the given number."""


class NotAVmBackup(InvalidArgument):
    """A restore point cannot serve a VM operation (it is a file backup, or has no saved VM definition)."""


class NeedsRoot(InvalidArgument):
    """The operation needs root privileges (loop devices, FUSE mounts of the repository, namespaces)."""


class InUse(InvalidArgument):
    """A target (a directory, a mountpoint, a work directory, a VM) is busy or holds something already."""


class NotFound(InvalidArgument):
    """A named thing the request refers to (a mount, a session, a VM) does not exist."""


# -- the job could not be done (exit 1) --------------------------------------------------------


class RepositoryNotFound(SurepointError):
    """No repository at the given location."""


class NotARepository(SurepointError):
    """The location holds something that is not a surepoint repository (or a version we cannot read)."""


class WrongPassphrase(SurepointError):
    pass


class RepositoryLocked(SurepointError):
    """A conflicting job holds a lock on the repository."""


class RestorePointNotFound(SurepointError):
    pass


class RestorePointForgotten(SurepointError):
    """A restore point being read was forgotten by a concurrent `forget` (not damage: it is gone on purpose)."""


class SourceError(SurepointError):
    """A backup source (disk image, device, VM) cannot be read."""


class TargetError(SurepointError):
    """A restore target cannot be written, or a system tool acting on it failed."""


class StorageError(SurepointError):
    """The storage under a repository failed (I/O error, read-only, unreachable)."""


class StorageFull(StorageError):
    pass


class ObjectNotFound(StorageError):
    """A storage backend holds no object of that name: the one not-found error of every backend.

    The repository layer turns it into a `DamagedData` naming what is missing (a chunk, an index)
    where the object should exist.
    """

    def __init__(self, name: str, *, hint: str | None = None) -> None:
        super().__init__(f"object {name} not found in the repository storage", hint=hint)
        self.name = name


class ObjectLocked(StorageError):
    """An object is under retention (S3 Object Lock): it can be deleted after `until` (a UNIX time), not before."""

    def __init__(self, name: str, until: float, *, hint: str | None = None) -> None:
        from datetime import UTC, datetime

        when = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M UTC")
        super().__init__(f"{name} is locked until {when}", hint=hint)
        self.name = name
        self.until = until


# -- stored data is damaged (exit 3) -----------------------------------------------------------


class DamagedData(SurepointError):
    """Stored data is missing or failed its digest or authentication check."""

    exit_code = 3


class UnreadableRestorePoints(DamagedData):
    """Some restore points cannot be read, so what they need is unknown: garbage collection refuses to run."""
