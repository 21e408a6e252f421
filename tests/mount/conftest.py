"""Fixtures for the mount tests: filesystem images built from a staging directory, partitioned disks,
and a per-test mount state directory that is always cleaned (no mount or loop device left behind)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import pytest

from tests.conftest import Cli

MiB = 1 << 20
NEEDED = ["mkfs.ext4", "losetup", "blkid", "mount", "umount", "fusermount3"]


def needs_root_and_tools(*extra: str):
    missing = [t for t in (*NEEDED, *extra) if shutil.which(t) is None]
    return [
        pytest.mark.root,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root: FUSE, loop devices, mounts"),
        pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
        pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}"),
    ]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


# -- staging tree -------------------------------------------------------------------------------

ODD_NAMES = ["with space", "ünïcödé", "-starts-with-dash", "[brackets]", "new\nline", "...", "a'quote\""]
MTIME = 1_600_000_000  # whole seconds: small ext4 images keep second resolution


def make_staging(root: Path) -> Path:
    """Files of several kinds: regular, sparse, empty, symlinks (one outside), nested dirs, odd names."""
    root.mkdir(parents=True)
    (root / "hello.txt").write_text("hello, world\n")
    (root / "random.bin").write_bytes(os.urandom(3 * MiB + 123))
    (root / "empty").write_bytes(b"")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"data in the middle" * 100)
        f.seek(12 * MiB)
        f.write(os.urandom(64 << 10))
    (root / "passwd-link").symlink_to("/etc/passwd")
    (root / "relative-link").symlink_to("hello.txt")
    (root / "escape").symlink_to("../../../../../../..")
    nested = root / "dir" / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "leaf.txt").write_text("leaf\n")
    (root / "dir" / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "dir" / "sub" / "script.sh", 0o750)
    os.chmod(root / "dir" / "sub", 0o710)
    (root / "private").write_text("secret\n")
    os.chmod(root / "private", 0o600)
    os.chown(root / "private", 1234, 5678)
    os.chown(root / "dir", 4321, 8765)
    for name in ODD_NAMES:
        (root / "odd").mkdir(exist_ok=True)
        (root / "odd" / name).write_text(f"name {name!r}\n")
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def make_ext4(image: Path, staging: Path, size: int = 64 * MiB, offset: int = 0) -> None:
    """An ext4 filesystem holding `staging`, in `image` at `offset` (the file is created or extended)."""
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(size + offset)
    extended = f"-E offset={offset}" if offset else ""
    argv = ["mkfs.ext4", "-q", "-F", "-d", str(staging), "-L", "surepoint-test"]
    if extended:
        argv += extended.split()
    sh(*argv, str(image), f"{size // 1024}k")


def kernel_filesystems() -> set[str]:
    with open("/proc/filesystems") as f:
        return {line.split()[-1] for line in f if line.strip()}


def second_fstype() -> str:
    """vfat where the kernel has it, else xfs, else ext4 (a kernel may lack FAT, a machine mkfs.xfs)."""
    for fstype, tool in (("vfat", "mkfs.vfat"), ("xfs", "mkfs.xfs")):
        if fstype in kernel_filesystems() and shutil.which(tool):
            return fstype
    return "ext4"


MIN_SIZE = {"vfat": 16 * MiB, "xfs": 320 * MiB, "ext4": 16 * MiB}


def make_fs_with_files(image: Path, fstype: str, offset: int, size: int, files: dict[str, bytes]) -> None:
    """A vfat, xfs or ext4 filesystem in `image` at `offset`, filled through a loop device and a temporary mount."""
    loop = sh("losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), str(image)).strip()
    try:
        if fstype == "vfat":
            sh("mkfs.vfat", "-n", "SPTEST", loop)
        elif fstype == "xfs":
            sh("mkfs.xfs", "-q", "-f", "-L", "sptest", loop)
        else:
            sh("mkfs.ext4", "-q", "-F", "-L", "sptest", loop)
        where = image.parent / f"{fstype}-{offset}"
        where.mkdir()
        sh("mount", "-t", fstype, loop, str(where))
        try:
            for name, data in files.items():
                (where / name).parent.mkdir(parents=True, exist_ok=True)
                (where / name).write_bytes(data)
        finally:
            sh("umount", str(where))
            where.rmdir()
    finally:
        sh("losetup", "-d", loop)


# -- partition tables, written by hand ---------------------------------------------------------


def write_mbr(image: Path, entries: list[tuple[int, int, int]], size: int) -> None:
    """An MBR with up to four (type, first sector, sector count) entries."""
    with open(image, "r+b" if image.exists() else "wb") as f:
        f.truncate(size)
        f.seek(0)
        sector = bytearray(512)
        for i, (ptype, lba, count) in enumerate(entries):
            struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba, count)
        sector[510:512] = b"\x55\xaa"
        f.write(sector)


def write_ebr(image: Path, ebr_lba: int, logical: tuple[int, int, int], next_rel: int | None, next_count: int) -> None:
    """An extended boot record: one logical partition (type, start relative to this EBR, count), then a link."""
    sector = bytearray(512)
    ptype, rel, count = logical
    struct.pack_into("<B3sB3sII", sector, 446, 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", rel, count)
    if next_rel is not None:
        struct.pack_into("<B3sB3sII", sector, 462, 0, b"\xfe\xff\xff", 0x05, b"\xfe\xff\xff", next_rel, next_count)
    sector[510:512] = b"\x55\xaa"
    with open(image, "r+b") as f:
        f.seek(ebr_lba * 512)
        f.write(sector)


LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
MS_BASIC = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")


def write_gpt(image: Path, size: int, parts: list[tuple[uuid.UUID, int, int, str]]) -> None:
    """A protective MBR and primary + backup GPT with (type, first LBA, last LBA, name) partitions."""
    sectors = size // 512
    with open(image, "r+b" if image.exists() else "wb") as f:
        f.truncate(size)
    write_mbr(image, [(0xEE, 1, min(sectors - 1, 0xFFFFFFFF))], size)
    entries = bytearray(128 * 128)
    for i, (ptype, first, last, name) in enumerate(parts):
        struct.pack_into("<16s16sQQQ", entries, i * 128, ptype.bytes_le, uuid.uuid4().bytes_le, first, last, 0)
        encoded = name.encode("utf-16-le")[:72]
        entries[i * 128 + 56 : i * 128 + 56 + len(encoded)] = encoded
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4().bytes_le

    def header(my_lba: int, alt_lba: int, entries_lba: int) -> bytes:
        fields = [
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            my_lba,
            alt_lba,
            34,
            sectors - 34,
            disk_guid,
            entries_lba,
            128,
            128,
        ]
        raw = struct.pack("<8sIIIIQQQQ16sQII", *fields) + struct.pack("<I", entries_crc)
        crc = zlib.crc32(raw)
        return raw[:16] + struct.pack("<I", crc) + raw[20:] + bytes(512 - 92)

    with open(image, "r+b") as f:
        f.seek(512)
        f.write(header(1, sectors - 1, 2))
        f.write(entries)
        f.seek((sectors - 33) * 512)
        f.write(entries)
        f.write(header(sectors - 1, 1, sectors - 33))


# -- fixtures -----------------------------------------------------------------------------------


def loops_under(path: Path) -> list[str]:
    out = sh("losetup", "-a")
    return [line for line in out.splitlines() if str(path) in line]


def attached_loops(under: Path | None = None) -> set[str]:
    """Loop devices attached (only those backed by a file below `under`: other tests run beside us)."""
    lines = [line for line in sh("losetup", "-a").splitlines() if line.strip()]
    return {line.split(":")[0] for line in lines if under is None or str(under) in line}


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


@pytest.fixture
def mcli(tmp_path: Path):
    """The CLI with its own mount state directory; afterwards nothing it mounted or attached is left."""
    cli = Cli(tmp_path)
    cli.env["SUREPOINT_MOUNT_STATE_DIR"] = str(tmp_path / "mount-state")
    before = attached_loops(tmp_path)
    yield cli
    cli.run("umount", "--all", "--lazy")
    deadline = time.monotonic() + 10  # loops of lazily unmounted filesystems go when those are released
    while attached_loops(tmp_path) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    new_loops = sorted(attached_loops(tmp_path) - before)
    mounts = mounts_under(tmp_path)
    for line in mounts[::-1]:
        subprocess.run(["umount", "-l", line.split()[4]], check=False)
    for device in new_loops:
        subprocess.run(["losetup", "-d", device], check=False)
    assert not new_loops and not mounts, f"left behind: {new_loops} {mounts}"
