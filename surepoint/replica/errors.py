"""Errors of replicas: a replica directory that is missing, busy, another VM's, or damaged."""

from __future__ import annotations

from surepoint.errors import DamagedData, InUse, InvalidArgument, SurepointError, TargetError


class ReplicaError(SurepointError):
    """Base of every error raised by surepoint.replica."""


class ReplicaNotFound(ReplicaError):
    """No replica at the given path."""


class NotAReplica(ReplicaError, InvalidArgument):
    """The path holds something that is not a replica (or a format version this program cannot read)."""


class ReplicaOfAnotherVm(ReplicaError, InvalidArgument):
    """The replica at the path was made from another VM."""


class ReplicaLocked(ReplicaError, InUse):
    """Another process writes to this replica (a replication cycle, a failover)."""


class ReplicaPointNotFound(ReplicaError, InvalidArgument):
    """A replica has no restore point matching the reference (id, id prefix, `latest` or a time)."""


class ReplicaStateError(ReplicaError, InvalidArgument):
    """The replica is in a state that forbids the operation (failed over, made permanent)."""


class ReplicaWriteError(ReplicaError, TargetError):
    """Writing the replica's disks failed (disk full, qemu-img failed); its last good state is intact."""


class ReplicaDamaged(ReplicaError, DamagedData):
    """A file the replica's record names is missing or unreadable."""


class ReplicaTransportError(ReplicaError):
    """The connection to the replica's site failed or its far end broke the protocol."""
