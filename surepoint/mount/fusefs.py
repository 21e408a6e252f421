"""The read-only FUSE filesystem of a mount: every disk as a raw image, and empty mountpoint directories.

Layout (DIR is the FUSE mount itself):

    DIR/disks/<n>-<disk name>.raw   the bytes of disk n, read from the repository on demand
    DIR/disk<n>/part<p>/            mountpoint of partition p of disk n (filled by a loop mount)
    DIR/disk<n>/fs/                 mountpoint of a whole-disk filesystem (no partition table)
    DIR/disk<n>/lvm-<vg>-<lv>/      mountpoint of an LVM logical volume
    DIR/disks/<n>-lvm-<vg>-<lv>.raw a logical volume made of several pieces of disk n, put together
    DIR/guest/                      mountpoint of the guest's tree (surepoint.mount.guest)

Built on mfusepy (ctypes over libfuse 3, multi-threaded): see docs/mount.md for why.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import SurepointError
from surepoint.mount.reader import ChunkReadError, DiskReader

log = logging.getLogger("surepoint.mount")

ATTR_TIMEOUT = 86400.0  # nothing in this filesystem ever changes
MAX_THREADS = 16
GUEST_DIR = "guest"


def load_mfusepy():
    """Import mfusepy bound to libfuse 3 (it would otherwise prefer a libfuse 2 it finds first)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except OSError as exc:
        raise SurepointError(f"cannot load libfuse 3 ({exc}): install it (Debian: apt install fuse3)") from None
    return mfusepy


def safe_name(name: str) -> str:
    """A disk name usable as one path component."""
    cleaned = "".join("_" if c in "/\0" or not c.isprintable() else c for c in name).strip()
    return cleaned.lstrip(".") or "disk"


class PiecesReader:
    """Reads of a volume made of byte ranges (pieces) of one disk, in order, as one image."""

    def __init__(self, reader: DiskReader, pieces: list[tuple[int, int]]) -> None:
        self.reader = reader
        self.pieces = list(pieces)
        self.size = sum(length for _offset, length in pieces)

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        start = 0
        for piece_offset, length in self.pieces:
            lo, hi = max(offset, start), min(offset + size, start + length)
            if lo < hi:
                out += self.reader.read(piece_offset + lo - start, hi - lo)
            start += length
        return bytes(out)

    def describe(self) -> str:
        return self.reader.describe() + f" (a volume of {len(self.pieces)} pieces)"


@dataclass
class DiskView:
    number: int
    reader: DiskReader
    volumes: list[str] = field(default_factory=list)  # mountpoint directory names under disk<n>/
    composed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # volume -> pieces of this disk

    @property
    def image_name(self) -> str:
        return f"{self.number}-{safe_name(self.reader.disk.name)}.raw"

    @property
    def dir_name(self) -> str:
        return f"disk{self.number}"


def image_path(mountpoint: str, view: DiskView) -> str:
    return os.path.join(mountpoint, "disks", view.image_name)


def volume_path(mountpoint: str, view: DiskView, volume: str) -> str:
    return os.path.join(mountpoint, view.dir_name, volume)


def composed_name(view: DiskView, volume: str) -> str:
    return f"{view.number}-{volume}.raw"


def composed_path(mountpoint: str, view: DiskView, volume: str) -> str:
    return os.path.join(mountpoint, "disks", composed_name(view, volume))


@dataclass
class _Image:
    """A file under disks/: a disk, or a volume put together from pieces of one."""

    reader: DiskReader | PiecesReader


def build_operations(views: list[DiskView], created_ns: int, on_ready: Callable[[], None]):
    """The mfusepy Operations object serving `views`; `on_ready` runs once the kernel talks to us."""
    fuse = load_mfusepy()
    images: dict[str, _Image] = {f"/disks/{v.image_name}": _Image(v.reader) for v in views}
    for v in views:
        for volume, pieces in v.composed.items():
            images[f"/disks/{composed_name(v, volume)}"] = _Image(PiecesReader(v.reader, pieces))
    dirs: dict[str, list[str]] = {
        "/": ["disks", GUEST_DIR] + [v.dir_name for v in views],
        "/disks": [name.removeprefix("/disks/") for name in images],
        f"/{GUEST_DIR}": [],
    }
    for v in views:
        dirs[f"/{v.dir_name}"] = list(v.volumes)
        for volume in v.volumes:
            dirs[f"/{v.dir_name}/{volume}"] = []
    by_fh = {i + 1: image for i, image in enumerate(images.values())}
    fh_of = {id(image): i + 1 for i, image in enumerate(images.values())}

    class RestorePointFs(fuse.Operations):
        use_ns = True

        def _times(self) -> dict:
            return {"st_atime": created_ns, "st_mtime": created_ns, "st_ctime": created_ns}

        def init_with_config(self, conn, config) -> None:
            if config is not None:
                config.entry_timeout = ATTR_TIMEOUT
                config.attr_timeout = ATTR_TIMEOUT
                config.negative_timeout = ATTR_TIMEOUT
                config.kernel_cache = 1
            if conn is not None:
                conn.max_readahead = 1 << 20
            on_ready()

        def getattr(self, path: str, fh=None) -> dict:
            if path in dirs:
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_uid": 0, "st_gid": 0, **self._times()}
            view = images.get(path)
            if view is not None:
                return {
                    "st_mode": stat.S_IFREG | 0o444,
                    "st_nlink": 1,
                    "st_size": view.reader.size,
                    "st_blocks": (view.reader.size + 511) // 512,
                    "st_uid": 0,
                    "st_gid": 0,
                    **self._times(),
                }
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh) -> list[str]:
            entries = dirs.get(path)
            if entries is None:
                raise fuse.FuseOSError(errno.ENOENT)
            return [".", "..", *entries]

        def open(self, path: str, fi) -> int:
            view = images.get(path)
            if view is None:
                raise fuse.FuseOSError(errno.EISDIR if path in dirs else errno.ENOENT)
            if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & (os.O_TRUNC | os.O_APPEND):
                raise fuse.FuseOSError(errno.EROFS)
            fi.fh = fh_of[id(view)]
            fi.keep_cache = 1
            return 0

        def read(self, path: str, size: int, offset: int, fi) -> bytes:
            view = by_fh.get(fi.fh) or images.get(path or "")
            if view is None:
                raise fuse.FuseOSError(errno.EBADF)
            try:
                return view.reader.read(offset, size)
            except ChunkReadError:
                raise fuse.FuseOSError(errno.EIO) from None  # logged by the reader
            except Exception:
                log.exception(
                    "%s: unexpected error reading %d bytes at offset %d", view.reader.describe(), size, offset
                )
                raise fuse.FuseOSError(errno.EIO) from None

        def release(self, path: str, fi) -> int:
            return 0

        def statfs(self, path: str) -> dict:
            total = sum(image.reader.size for image in images.values())
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096, "f_namemax": 255}

        def access(self, path: str, amode: int) -> int:
            if amode & os.W_OK:
                raise fuse.FuseOSError(errno.EROFS)
            return 0

    return RestorePointFs()


def serve(mountpoint: str, views: list[DiskView], fsname: str, created_ns: int, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted (runs libfuse's multi-threaded loop in this thread)."""
    fuse = load_mfusepy()
    operations = build_operations(views, created_ns, on_ready)
    fuse.FUSE(
        operations,
        mountpoint,
        raw_fi=True,
        foreground=True,
        ro=True,
        allow_other=True,
        default_permissions=True,
        fsname=fsname,
        subtype="surepoint",
        max_threads=MAX_THREADS,
    )
