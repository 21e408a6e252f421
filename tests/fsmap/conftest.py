"""Filesystem images made by the real tools (mkfs.ext4, mkfs.xfs, mkswap, sfdisk, debugfs) on plain
files, and the free space those tools' own inspectors report (dumpe2fs, xfs_db), to compare with."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from surepoint.repo.extents import Extent, merge

MiB = 1 << 20


def needs(*tools: str):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def needs_root(*tools: str):
    return [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices"), needs(*tools)]


def sh(*argv: str | os.PathLike, input: str | None = None) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, input=input).stdout


def staging(root: Path, *, files: int = 30, seed: int = 0, marker: bytes = b"") -> Path:
    """A directory of files of assorted sizes; file i starts with `marker` when one is given."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        size = rng.choice([0, 100, 5000, 70_000, 300_000, 1_500_000])
        (root / f"f{i:03d}").write_bytes(marker + rng.randbytes(size))
    return root


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_ext4(path: Path, size: int, *options: str, files: Path | None = None, remove: tuple[str, ...] = ()) -> Path:
    """mke2fs on a file (no root), optionally filled from a directory and with some files removed."""
    blank(path, size)
    sh("mke2fs", "-q", "-F", *options, *(["-d", files] if files else []), path)
    for name in remove:
        sh("debugfs", "-w", "-R", f"rm {name}", path)
    return path


def ext4_free(path: Path) -> list[Extent]:
    """The free blocks dumpe2fs reports (with bigalloc it names the first block of the last cluster)."""
    out = sh("dumpe2fs", path)
    bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))
    cluster = re.search(r"Cluster size:\s+(\d+)", out)
    tail = int(cluster.group(1)) - bs if cluster else 0
    free = []
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            a, _, b = part.partition("-")
            free.append(Extent(int(a) * bs, (int(b or a) - int(a) + 1) * bs + tail))
    return merge(free)


def make_xfs(path: Path, size: int, *options: str, files: Path | None = None) -> Path:
    """mkfs.xfs on a file (no root); files come in through a prototype file."""
    blank(path, size)
    argv = ["mkfs.xfs", "-q", "-f", *options]
    if files:
        proto = path.with_suffix(".proto")
        lines = ["/", "0 0", "d--755 0 0"]
        lines += [f"{p.name} ---644 0 0 {p}" for p in sorted(files.iterdir())]
        proto.write_text("\n".join([*lines, "$", "$", ""]))
        argv += ["-p", str(proto)]
    sh(*argv, path)
    return path


def xfs_free(path: Path) -> list[Extent]:
    """The free extents xfs_db reports (free-space btree and AG free list)."""
    out = sh("xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize agblocks", "-c", "freesp -d", path)
    bs = int(re.search(r"blocksize = (\d+)", out).group(1))
    agblocks = int(re.search(r"agblocks = (\d+)", out).group(1))
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.M)
    return merge(Extent((int(a) * agblocks + int(b)) * bs, int(n) * bs) for a, b, n in rows)


def reader(path: Path):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    return (lambda offset, length: os.pread(fd, length, offset)), size


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy_into(image: Path, offset: int, source: Path) -> None:
    """Copy a filesystem image into a disk image at a byte offset, keeping holes."""
    sh("dd", f"if={source}", f"of={image}", "bs=1M", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc,sparse")


def partition(image: Path, script: str) -> list[tuple[int, int]]:
    """Partition a disk image with sfdisk; returns (start, size) in bytes of each partition."""
    sh("sfdisk", "-q", image, input=script)
    out = sh("sfdisk", "-J", image)
    import json

    table = json.loads(out)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]
