"""Errors a user can cause or meet, each with the exit code the command line gives it."""

from __future__ import annotations


class SurepointError(Exception):
    """Base of every error that the CLI reports as one clear line instead of a traceback."""

    exit_code = 1


class UsageError(SurepointError):
    exit_code = 2


class RepositoryNotFound(SurepointError):
    pass


class NotARepository(SurepointError):
    pass


class WrongPassphrase(SurepointError):
    pass


class RepositoryLocked(SurepointError):
    pass


class RestorePointNotFound(SurepointError):
    pass


class SourceError(SurepointError):
    pass


class TargetError(SurepointError):
    pass


class StorageFull(SurepointError):
    pass


class DamagedData(SurepointError):
    """Stored data failed its digest or authentication check."""

    exit_code = 3


class ObjectMissing(DamagedData):
    pass
