"""LVM2 inside a partition: metadata written by the real lvm tools (activation off: no device-mapper
needed), filesystems placed at the extents lvm chose, then the disk mapped from its bytes alone."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid

import pytest

from surepoint.fsmap import Status, map_disk
from surepoint.repo.extents import Extent, merge
from tests.fsmap.conftest import (
    MiB,
    blank,
    ext4_free,
    make_ext4,
    make_xfs,
    needs,
    partition,
    reader,
    sh,
    staging,
    xfs_free,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices"),
    needs("pvcreate", "vgcreate", "lvcreate", "vgcfgrestore", "losetup", "mke2fs", "dumpe2fs", "mkfs.xfs", "xfs_db"),
    needs("mkswap", "sfdisk"),
]


class Lvm:
    """lvm commands that see only one loop device and leave nothing behind on this machine."""

    def __init__(self, device: str) -> None:
        self.config = (
            "global { activation = 0 } backup { backup = 0 archive = 0 } "
            f'devices {{ filter = [ "a|^{device}$|", "r|.*|" ] use_devicesfile = 0 obtain_device_list_from_udev = 0 '
            'hints = "none" }'
        )

    def __call__(self, *argv: str) -> str:
        env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
        return subprocess.run(
            [argv[0], "--config", self.config, *argv[1:]], check=True, capture_output=True, text=True, env=env
        ).stdout


@contextlib.contextmanager
def loop(image, offset: int, size: int):
    device = sh("losetup", "-f", "--show", f"--offset={offset}", f"--sizelimit={size}", image).strip()
    try:
        yield device
    finally:
        sh("losetup", "-d", device)


def make_snapshot(lvm: Lvm, vg: str, path, *, origin: str, cow: str) -> None:
    """Turn `cow` into a snapshot of `origin`: lvcreate -s needs device-mapper, vgcfgrestore does not."""
    lvm("vgcfgbackup", "-q", "-f", str(path), vg)
    text = path.read_text()
    end = text.rindex("\t}\n\n}")  # the end of the logical_volumes section
    snapshot = (
        '\t\tsnapshot0 {\n\t\t\tid = "Snapsh-ot00-0000-0000-0000-0000-000000"\n\t\t\tstatus = ["READ"]\n'
        "\t\t\tflags = []\n\t\t\tsegment_count = 1\n\t\t\tsegment1 {\n\t\t\t\tstart_extent = 0\n"
        f'\t\t\t\textent_count = 10\n\t\t\t\ttype = "snapshot"\n\t\t\t\tchunk_size = 8\n'
        f'\t\t\t\torigin = "{origin}"\n\t\t\t\tcow_store = "{cow}"\n\t\t\t}}\n\t\t}}\n'
    )
    path.write_text(text[:end] + snapshot + text[end:])
    lvm("vgcfgrestore", "-q", "-f", str(path), vg)
    assert "swi" in lvm("lvs", "-o", "lv_attr", f"{vg}/{cow}")


def segments(lvm: Lvm, vg: str) -> dict[str, list[tuple[int, int]]]:
    """LV name -> [(first PE, PE count)] in LV order."""
    out = json.loads(lvm("lvs", "--reportformat", "json", "-o", "lv_name,seg_pe_ranges", "--segments", vg))
    result: dict[str, list[tuple[int, int]]] = {}
    report = out["report"][0]
    for row in report.get("seg") or report["lv"]:
        if not row["seg_pe_ranges"]:
            continue
        first, last = row["seg_pe_ranges"].rsplit(":", 1)[1].split("-")
        result.setdefault(row["lv_name"], []).append((int(first), int(last) - int(first) + 1))
    return result


@pytest.fixture(scope="module")
def lvm_disk(tmp_path_factory):
    """A GPT disk whose second partition is an LVM PV: root (XFS, two segments), home (ext4), swap,
    data (ext4, with a snapshot), and the extents of a removed LV left unallocated."""
    tmp = tmp_path_factory.mktemp("lvm")
    files = staging(tmp / "files")
    disk = blank(tmp / "disk.img", 1024 * MiB)
    (_boot, (pv_start, pv_size)) = partition(disk, "label: gpt\n,50M\n,\n")
    vg = "sptest" + uuid.uuid4().hex[:8]
    with loop(disk, pv_start, pv_size) as device:
        lvm = Lvm(device)
        lvm("pvcreate", "-q", device)
        lvm("vgcreate", "-q", vg, device)
        for name, size in (("root", "200M"), ("home", "100M"), ("swap", "64M"), ("gone", "40M")):
            lvm("lvcreate", "-q", "-an", "-Zn", "-L", size, "-n", name, vg)
        lvm("lvextend", "-q", "-L", "+152M", f"{vg}/root")  # a second segment, after the others
        lvm("lvremove", "-q", "-f", f"{vg}/gone")  # its extents become unallocated
        lvm("lvcreate", "-q", "-an", "-Zn", "-L", "40M", "-n", "data", vg)
        lvm("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "snap", vg)
        make_snapshot(lvm, vg, tmp / "vg.txt", origin="data", cow="snap")
        layout = segments(lvm, vg)
        pe_start = int(lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start").split()[0])
        extent = int(lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg).split()[0])
    base = pv_start + pe_start

    def pieces(name):
        return [Extent(base + first * extent, count * extent) for first, count in layout[name]]

    expected = {}
    for name, make, oracle in (
        ("root", lambda p, n: make_xfs(p, n, files=files), xfs_free),
        ("home", lambda p, n: make_ext4(p, n, "-t", "ext4", files=files, remove=("f002",)), ext4_free),
        ("data", lambda p, n: make_ext4(p, n, "-t", "ext4", files=files), ext4_free),
    ):
        image = make(tmp / f"{name}.img", sum(p.length for p in pieces(name)))
        with open(image, "rb") as src, open(disk, "r+b") as dst:
            for piece in pieces(name):
                dst.seek(piece.offset)
                dst.write(src.read(piece.length))
        expected[name] = _to_disk(pieces(name), oracle(image))
    swap = tmp / "swap.img"
    blank(swap, 64 * MiB)
    sh("mkswap", "-q", swap)
    with open(swap, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(pieces("swap")[0].offset)
        dst.write(src.read(4096))
    expected["swap"] = _to_disk(pieces("swap"), [Extent(4096, 64 * MiB - 4096)])
    return disk, vg, layout, pieces, expected


def _to_disk(pieces: list[Extent], free: list[Extent]) -> list[Extent]:
    out, pos = [], 0
    for piece in pieces:
        for e in free:
            lo, hi = max(e.offset, pos), min(e.end, pos + piece.length)
            if lo < hi:
                out.append(Extent(piece.offset + lo - pos, hi - lo))
        pos += piece.length
    return merge(out)


def test_linear_volumes_are_mapped(lvm_disk):
    disk, vg, layout, _pieces, expected = lvm_disk
    assert len(layout["root"]) == 2
    read, size = reader(disk)
    volumes = {v.where: v for v in map_disk(read, size).volumes}
    root, home, swap = (volumes[f"logical volume {vg}/{n}"] for n in ("root", "home", "swap"))
    assert (root.kind, root.status) == ("xfs", Status.MAPPED)
    assert root.free == expected["root"]
    assert (home.kind, home.status) == ("ext4", Status.MAPPED)
    assert home.free == expected["home"]
    assert (swap.kind, swap.status) == ("swap", Status.SKIPPED)
    assert swap.free == expected["swap"]


def test_a_volume_with_a_snapshot_is_read_in_full(lvm_disk):
    disk, vg, _layout, _pieces, _expected = lvm_disk
    read, size = reader(disk)
    volumes = {v.where: v for v in map_disk(read, size).volumes}
    data = volumes[f"logical volume {vg}/data"]
    assert data.status is Status.READ and data.free == [] and "builds on it" in data.reason
    assert volumes[f"logical volume {vg}/snap"].status is Status.READ


def test_unallocated_extents_are_skipped(lvm_disk):
    disk, vg, layout, pieces, _expected = lvm_disk
    read, size = reader(disk)
    volumes = {v.where: v for v in map_disk(read, size).volumes}
    unallocated = volumes[f"volume group {vg}"]
    used = merge(p for name in layout for p in pieces(name))
    assert unallocated.free and unallocated.status is Status.SKIPPED
    for e in unallocated.free:
        assert not any(e.offset < u.end and u.offset < e.end for u in used)
    # The removed LV's 40 MiB and the tail of the PV are among them.
    assert sum(e.length for e in unallocated.free) >= 40 * MiB
