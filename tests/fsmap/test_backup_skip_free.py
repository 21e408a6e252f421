"""Backups that skip free blocks: the restored filesystems check clean, every file comes back, and
what a deleted file held never reaches the repository (unlike a backup that reads everything)."""

from __future__ import annotations

import filecmp
import os
import secrets
import shutil
from pathlib import Path

import pytest
import zstandard

from tests.fsmap.conftest import (
    MiB,
    blank,
    copy_into,
    make_ext4,
    make_xfs,
    needs,
    partition,
    sh,
    staging,
)

pytestmark = needs("mke2fs", "debugfs", "e2fsck", "mkfs.xfs", "xfs_repair", "mkswap", "sfdisk")


def marker_file(path: Path) -> bytes:
    marker = b"DELETED-" + secrets.token_hex(16).encode()
    path.write_bytes((marker + b" confidential payroll data\n") * 20000)  # ~1 MiB of it
    return marker


def plain_chunks(repo: Path):
    """Every stored chunk's plaintext, decoded from the documented envelope of an unencrypted repository."""
    for path in (repo / "chunks").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert blob[:4] == b"SPO1" and blob[6] == 0, "expected an unencrypted repository"
            payload = blob[8:-32]
            yield zstandard.ZstdDecompressor().decompress(payload, max_output_size=64 * MiB) if blob[5] else payload


def repo_contains(repo: Path, marker: bytes) -> bool:
    return any(marker in chunk for chunk in plain_chunks(repo))


def image_contains(image: Path, marker: bytes) -> bool:
    with open(image, "rb") as f:
        while block := f.read(16 * MiB):
            if marker in block:
                return True
    return False


def extract(disk: Path, start: int, size: int, out: Path) -> Path:
    sh(
        "dd",
        f"if={disk}",
        f"of={out}",
        "bs=1M",
        f"skip={start}",
        f"count={size}",
        "iflag=skip_bytes,count_bytes",
        "conv=sparse",
    )
    return out


@pytest.fixture
def disk(tmp_path):
    """A GPT disk: ext4 with a deleted secret, XFS with files, swap that held data, an empty partition."""
    files = staging(tmp_path / "files", files=25)
    marker = marker_file(files / "secret.txt")
    ext = make_ext4(tmp_path / "ext4.img", 200 * MiB, "-t", "ext4", files=files, remove=("secret.txt",))
    shutil.move(files / "secret.txt", tmp_path / "secret.txt")
    xf = make_xfs(tmp_path / "xfs.img", 320 * MiB, files=files)
    sw = blank(tmp_path / "swap.img", 64 * MiB)
    sh("mkswap", "-q", sw)
    with open(sw, "r+b") as f:  # pages a running system swapped out
        f.seek(8 * MiB)
        f.write(marker * 1000)
    image = blank(tmp_path / "disk.img", 700 * MiB)
    layout = partition(image, "label: gpt\n,200M\n,320M\n,64M,S\n,\n")
    for (start, _size), part in zip(layout, (ext, xf, sw), strict=False):
        copy_into(image, start, part)
    assert image_contains(image, marker)  # the deleted file's bytes are still on the disk
    return image, layout, files, marker


def test_free_blocks_are_skipped_and_everything_restores(cli, tmp_path, disk):
    image, layout, files, marker = disk
    cli.run("init", "--encryption", "none", "--chunk-size", "262144", check=True)
    result = cli.run("backup", str(image), "--json", check=True)
    point = result.json()
    volumes = {v["where"]: v for v in point["disks"][0]["metadata"]["free_space"]["volumes"]}
    assert [volumes[f"partition {n}"]["kind"] for n in (1, 2, 3, 4)] == ["ext4", "xfs", "swap", "unknown"]
    assert [volumes[f"partition {n}"]["status"] for n in (1, 2, 3, 4)] == ["mapped", "mapped", "skipped", "read"]
    assert "ext4, free blocks skipped" in result.stderr and "read in full" in result.stderr
    assert point["disks"][0]["read_bytes"] < 150 * MiB
    assert not repo_contains(cli.repo, marker)

    restored = tmp_path / "restored.img"
    cli.run("restore", point["id"], "--to", str(restored), check=True)
    (ext, xf, sw, _empty) = layout
    ext_img = extract(restored, *ext, tmp_path / "r-ext4.img")
    sh("e2fsck", "-fn", ext_img)
    out = tmp_path / "dump"
    out.mkdir()
    sh("debugfs", "-R", f"rdump / {out}", ext_img)
    compare = filecmp.dircmp(files, out, ignore=["lost+found"])
    assert not compare.left_only and not compare.right_only and not compare.diff_files
    assert all(filecmp.cmp(files / n, out / n, shallow=False) for n in os.listdir(files))
    xfs_img = extract(restored, *xf, tmp_path / "r-xfs.img")
    sh("xfs_repair", "-n", "-f", xfs_img)
    sh("swaplabel", extract(restored, *sw, tmp_path / "r-swap.img"))  # still a swap area


def test_without_skipping_the_deleted_data_is_stored(cli, disk):
    image, _layout, _files, marker = disk
    cli.run("init", "--encryption", "none", "--chunk-size", "262144", check=True)
    point = cli.run("backup", str(image), "--no-skip-free", "--json", check=True).json()
    assert "free_space" not in point["disks"][0]["metadata"]
    assert repo_contains(cli.repo, marker)


# --- as root: filesystems used through the kernel, files deleted the usual way, LVM inside ----------


@pytest.fixture
def loops():
    devices: list[str] = []

    def attach(image: Path, offset: int, size: int) -> str:
        devices.append(sh("losetup", "-f", "--show", f"--offset={offset}", f"--sizelimit={size}", image).strip())
        return devices[-1]

    yield attach
    for device in reversed(devices):
        sh("losetup", "-d", device)


@pytest.fixture
def mounts(tmp_path):
    points: list[Path] = []

    def mount(device: str, name: str) -> Path:
        where = tmp_path / "mnt" / name
        where.mkdir(parents=True)
        sh("mount", device, where)
        points.append(where)
        return where

    def umount_all() -> None:
        while points:
            sh("umount", points.pop())

    mount.umount_all = umount_all  # type: ignore[attr-defined]
    yield mount
    umount_all()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")
@needs("losetup", "mount", "pvcreate", "vgcfgbackup")
def test_used_filesystems_with_lvm_restore_file_for_file(cli, tmp_path, loops, mounts):
    from tests.fsmap.test_lvm import Lvm, segments

    files = staging(tmp_path / "files", files=40, seed=7)
    secret = tmp_path / "secret.txt"
    marker = marker_file(secret)
    image = blank(tmp_path / "disk.img", 1024 * MiB)
    (ext, (pv_start, pv_size)) = partition(image, "label: gpt\n,300M\n,\n")
    vg = "sptest" + secrets.token_hex(4)
    pv = loops(image, pv_start, pv_size)
    lvm = Lvm(pv)
    lvm("pvcreate", "-q", pv)
    lvm("vgcreate", "-q", vg, pv)
    lvm("lvcreate", "-q", "-an", "-Zn", "-L", "400M", "-n", "root", vg)
    ((first_pe, count),) = segments(lvm, vg)["root"]
    pe_start = int(lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start").split()[0])
    extent = int(lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg).split()[0])
    lv = (pv_start + pe_start + first_pe * extent, count * extent)

    ext_dev, xfs_dev = loops(image, *ext), loops(image, *lv)
    sh("mkfs.ext4", "-q", ext_dev)
    sh("mkfs.xfs", "-q", xfs_dev)
    for device, name in ((ext_dev, "ext4"), (xfs_dev, "xfs")):
        where = mounts(device, name)
        shutil.copytree(files, where / "files")
        shutil.copy(secret, where / "secret.txt")
        sh("sync")
        (where / "secret.txt").unlink()
    mounts.umount_all()
    assert image_contains(image, marker)

    cli.run("init", "--encryption", "none", check=True)
    point = cli.run("backup", str(image), "--json", check=True).json()
    volumes = {v["where"]: v for v in point["disks"][0]["metadata"]["free_space"]["volumes"]}
    assert volumes["partition 1"]["status"] == "mapped"
    assert volumes[f"logical volume {vg}/root"]["kind"] == "xfs"
    assert volumes[f"logical volume {vg}/root"]["status"] == "mapped"
    assert not repo_contains(cli.repo, marker)

    restored = tmp_path / "restored.img"
    cli.run("restore", point["id"], "--to", str(restored), check=True)
    r_ext, r_xfs = loops(restored, *ext), loops(restored, *lv)
    sh("e2fsck", "-fn", r_ext)
    sh("xfs_repair", "-n", r_xfs)
    for device, name in ((r_ext, "r-ext4"), (r_xfs, "r-xfs")):
        where = mounts(device, name)
        assert not (where / "secret.txt").exists()
        compare = filecmp.dircmp(files, where / "files")
        assert not compare.left_only and not compare.right_only
        assert all(filecmp.cmp(files / n, where / "files" / n, shallow=False) for n in os.listdir(files))
    mounts.umount_all()
