"""Point-in-time copies of image files on the host, made with reflinks (FICLONE): instant, no data copied.

Works where the images live on a filesystem that shares extents (xfs with reflink=1, btrfs).
Writes after the clone go to the original; the clone keeps the frozen moment until it is removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from surepoint.errors import SourceError

FICLONE = 0x40049409


def reflink_clone(source: str, target: str) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as exc:
            os.close(dst)
            os.unlink(target)
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise SourceError(
                    f"cannot snapshot {source}: its filesystem cannot share extents (reflink); keep images on "
                    "xfs (reflink=1) or btrfs for application-aware host backups"
                ) from None
            raise SourceError(f"cannot snapshot {source}: {exc.strerror}") from None
        os.close(dst)
    finally:
        os.close(src)


def snapshot_files(paths: Sequence[str]) -> list[str]:
    """Clone every image (the caller holds the applications frozen); return the clone paths."""
    clones: list[str] = []
    try:
        for path in paths:
            clone = f"{path}.surepoint-snapshot"
            if os.path.exists(clone):
                os.unlink(clone)  # left by a crashed job
            reflink_clone(path, clone)
            clones.append(clone)
    except BaseException:
        remove_snapshots(clones)
        raise
    return clones


def remove_snapshots(clones: Sequence[str]) -> None:
    for clone in clones:
        try:
            os.unlink(clone)
        except FileNotFoundError:
            pass


@contextmanager
def kept_snapshots(clones: list[str]) -> Iterator[list[str]]:
    try:
        yield clones
    finally:
        remove_snapshots(clones)
