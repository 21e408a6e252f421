"""Disk images of a small "guest" for the guest-path and file-index tests, built without booting:

disk 0 (GPT): partition 1 ext4 root (its /etc/fstab below), partition 2 an LVM physical volume
               (volume group `vg-guest`) with logical volumes `srv` (in two pieces: extended
               after `home` was made) and `home` (ext4);
disk 1:        a whole-disk ext4 labelled `appdata`, mounted by the guest at /data.

The LVM metadata is written by the real lvm tools with activation off (this kernel may have no
device-mapper), and each filesystem is copied to the extents lvm chose, as tests/fsmap does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
VG = "vg-guest"
TOOLS = ("sfdisk", "mke2fs", "pvcreate", "vgcreate", "lvcreate", "losetup")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def sh(*argv: str | os.PathLike, input: str | None = None) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, input=input).stdout


def fstab(root_partuuid: str) -> str:
    return (
        "# /etc/fstab of the test guest\n"
        f"PARTUUID={root_partuuid}  /  ext4  defaults  0 1\n"
        "LABEL=appdata  /data  ext4  defaults,nofail  0 2\n"
        f"/dev/mapper/{VG.replace('-', '--')}-srv  /srv  ext4  defaults  0 2\n"
        f"/dev/{VG}/home  /home  ext4  defaults  0 2\n"
        "UUID=0badc0de-0000-4000-8000-000000000000  /gone  ext4  defaults,nofail  0 2\n"
        "tmpfs  /tmp  tmpfs  defaults  0 0\n"
        "/dev/vdc1  none  swap  sw  0 0\n"
    )


@dataclass
class GuestDisks:
    disk0: Path
    disk1: Path
    pieces: dict[str, list[tuple[int, int]]]  # filesystem -> [(offset in its disk image, size)...]
    root_partuuid: str


def _lvm(device: str, *argv: str) -> str:
    config = (
        "global { activation = 0 } backup { backup = 0 archive = 0 } "
        f'devices {{ filter = [ "a|^{device}$|", "r|.*|" ] use_devicesfile = 0 obtain_device_list_from_udev = 0 '
        'hints = "none" }'
    )
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    return subprocess.run(
        [argv[0], "--config", config, *argv[1:]], check=True, capture_output=True, text=True, env=env
    ).stdout


@contextlib.contextmanager
def _loop(image: Path, offset: int, size: int):
    device = sh("losetup", "-f", "--show", f"--offset={offset}", f"--sizelimit={size}", image).strip()
    try:
        yield device
    finally:
        sh("losetup", "-d", device)


def _ext4(path: Path, size: int, files: Path, *options: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mke2fs", "-q", "-F", "-t", "ext4", *options, "-d", files, path)
    return path


def _tree(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True)
    for name in dirs:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def build(tmp: Path, *, root_files: dict[str, bytes], data_files: dict[str, bytes], srv_files: dict[str, bytes],
          home_files: dict[str, bytes] | None = None) -> GuestDisks:  # fmt: skip
    """The two disk images (see the module docstring) with these files in each filesystem."""
    tmp.mkdir(parents=True, exist_ok=True)
    disk0, disk1 = tmp / "disk0.img", tmp / "disk1.img"
    with open(disk0, "wb") as f:
        f.truncate(160 * MiB)
    sh("sfdisk", "-q", disk0, input="label: gpt\n,60M,L\n,,E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    table = json.loads(sh("sfdisk", "-J", disk0))["partitiontable"]
    (root_start, root_size), (pv_start, pv_size) = [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    partuuid = table["partitions"][0]["uuid"].lower()
    with _loop(disk0, pv_start, pv_size) as device:
        _lvm(device, "pvcreate", "-q", device)
        _lvm(device, "vgcreate", "-q", VG, device)
        for name, size in (("srv", "16M"), ("home", "16M")):
            _lvm(device, "lvcreate", "-q", "-an", "-Zn", "-L", size, "-n", name, VG)
        _lvm(device, "lvextend", "-q", "-L", "+16M", f"{VG}/srv")  # a second piece, after home
        report = json.loads(
            _lvm(device, "lvs", "--reportformat", "json", "-o", "lv_name,seg_pe_ranges", "--segments", VG)
        )["report"][0]
        pe_start = int(_lvm(device, "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start").split()[0])
        extent = int(
            _lvm(device, "vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", VG).split()[0]
        )
    pieces: dict[str, list[tuple[int, int]]] = {"root": [(root_start, root_size)]}
    for row in report.get("seg") or report["lv"]:
        first, last = row["seg_pe_ranges"].rsplit(":", 1)[1].split("-")
        piece = (pv_start + pe_start + int(first) * extent, (int(last) - int(first) + 1) * extent)
        pieces.setdefault(row["lv_name"], []).append(piece)
    assert len(pieces["srv"]) == 2, pieces
    root_tree = _tree(
        tmp / "t-root",
        {"etc/fstab": fstab(partuuid).encode(), **root_files},
        dirs=("data", "srv", "home", "gone", "tmp"),
    )
    trees = {
        "root": root_tree,
        "srv": _tree(tmp / "t-srv", srv_files),
        "home": _tree(tmp / "t-home", home_files or {"user/notes.txt": b"notes\n"}),
    }
    for name, tree in trees.items():
        image = _ext4(tmp / f"{name}.fs", sum(size for _o, size in pieces[name]), tree, "-U", str(uuid.uuid4()))
        with open(image, "rb") as src, open(disk0, "r+b") as dst:
            for offset, size in pieces[name]:
                dst.seek(offset)
                dst.write(src.read(size))
        image.unlink()
    _ext4(disk1, 48 * MiB, _tree(tmp / "t-data", data_files), "-L", "appdata")
    pieces["data"] = [(0, 48 * MiB)]
    for tree in [*trees.values(), tmp / "t-data"]:
        shutil.rmtree(tree)
    return GuestDisks(disk0, disk1, pieces, partuuid)


def rewrite_fs(disks: GuestDisks, name: str, files: dict[str, bytes | None], tmp: Path) -> None:
    """Change files of one filesystem in place (None deletes), through a loop mount of its piece."""
    image = disks.disk1 if name == "data" else disks.disk0
    [(offset, size)] = disks.pieces[name]  # a filesystem in one piece
    where = tmp / f"m-{name}"
    where.mkdir(exist_ok=True)
    with _loop(image, offset, size) as device:
        sh("mount", device, where)
        try:
            for path, data in files.items():
                target = where / path
                if data is None:
                    target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
        finally:
            sh("umount", where)
    where.rmdir()
