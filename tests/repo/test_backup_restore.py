"""Backups restore to byte-identical images: full and incremental, encrypted and not, files and devices."""

import os
import subprocess

import pytest

from tests.conftest import change_image, make_image, sha256_file

SMALL_CHUNKS = "262144"


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm", "chacha20-poly1305"])
def test_full_and_incremental_restore_bit_exact(cli, tmp_path, encryption):
    image = make_image(tmp_path / "disk.img", 48 << 20, seed=1)
    cli.run("init", "--encryption", encryption, "--chunk-size", SMALL_CHUNKS, check=True)
    cli.run("backup", str(image), "--name", "vm1", check=True)
    first_sha = sha256_file(image)
    change_image(image, seed=2)
    cli.run("backup", str(image), "--name", "vm1", check=True)
    second_sha = sha256_file(image)

    points = cli.points()
    assert [p["name"] for p in points] == ["vm1", "vm1"]
    assert points[1]["parent"] == points[0]["id"]
    for point, expected in zip(points, [first_sha, second_sha], strict=True):
        out = tmp_path / f"restored-{point['id']}.img"
        cli.run("restore", point["id"], "--to", str(out), check=True)
        assert sha256_file(out) == expected
    # restore by NAME:latest
    cli.run("restore", "vm1:latest", "--to", str(tmp_path / "latest.img"), check=True)
    assert sha256_file(tmp_path / "latest.img") == second_sha


@pytest.mark.s3
def test_incremental_stores_only_changed_chunks(cli, tmp_path):
    image = make_image(tmp_path / "disk.img", 64 << 20, seed=3, regions=12)
    cli.run("init", "--encryption", "none", "--chunk-size", SMALL_CHUNKS, check=True)
    first = cli.run("backup", str(image), "--json", check=True).json()
    change_image(image, seed=4, writes=3, length=4096)
    second = cli.run("backup", str(image), "--json", check=True).json()
    disk1, disk2 = first["disks"][0], second["disks"][0]
    assert disk1["new_chunks"] > 10
    # three 4 KiB writes touch at most six 256 KiB chunks
    assert 1 <= disk2["new_chunks"] <= 6
    assert disk2["reused_chunks"] >= disk1["new_chunks"] - 6
    # a third backup with no change stores nothing
    third = cli.run("backup", str(image), "--json", check=True).json()
    assert third["disks"][0]["new_chunks"] == 0


def test_holes_and_zero_chunks_are_not_stored_and_restore_sparse(cli, tmp_path):
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(200 << 20)
        f.write(bytes(4 << 20))  # allocated but all zeros
    cli.run("init", "--encryption", "none", check=True)
    point = cli.run("backup", str(image), "--json", check=True).json()
    disk = point["disks"][0]
    assert disk["new_chunks"] == 1
    assert disk["read_bytes"] <= 12 << 20  # holes are never read
    repo_bytes = sum(f.stat().st_size for f in (cli.repo / "chunks").rglob("*") if f.is_file())
    assert repo_bytes < 2 << 20
    out = tmp_path / "restored.img"
    cli.run("restore", point["id"], "--to", str(out), check=True)
    assert sha256_file(out) == sha256_file(image)
    assert os.stat(out).st_blocks * 512 < 8 << 20  # restored sparse, not 256 MiB of zeros


def test_identical_data_across_sources_is_stored_once(cli, tmp_path):
    a = make_image(tmp_path / "a.img", 32 << 20, seed=5)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes())
    cli.run("init", "--encryption", "aes-256-gcm", "--chunk-size", SMALL_CHUNKS, check=True)
    cli.run("backup", str(a), "--name", "a", check=True)
    second = cli.run("backup", str(b), "--name", "b", "--json", check=True).json()
    assert second["disks"][0]["new_chunks"] == 0
    assert second["parent"] is None


@pytest.mark.s3
def test_several_disks_in_one_restore_point(cli, tmp_path):
    disks = [make_image(tmp_path / f"d{i}.img", (8 + i * 8) << 20, seed=10 + i) for i in range(3)]
    cli.run("init", "--encryption", "none", "--chunk-size", SMALL_CHUNKS, check=True)
    point = cli.run("backup", *map(str, disks), "--name", "multi", "--json", check=True).json()
    assert [d["number"] for d in point["disks"]] == [0, 1, 2]
    for i, disk in enumerate(disks):
        out = tmp_path / f"out{i}.img"
        cli.run("restore", "multi:latest", "--disk", str(i), "--to", str(out), check=True)
        assert sha256_file(out) == sha256_file(disk)
    bad = cli.run("restore", "multi:latest", "--disk", "7", "--to", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no disk 7" in bad.stderr


@pytest.mark.s3
def test_verify_marks_points_verified(cli, tmp_path):
    image = make_image(tmp_path / "disk.img", 16 << 20, seed=6)
    cli.run("init", "--encryption", "aes-256-gcm", "--chunk-size", SMALL_CHUNKS, check=True)
    cli.run("backup", str(image), check=True)
    assert cli.points()[0]["state"] == "unverified"
    report = cli.run("verify", "--json", check=True).json()
    assert report["damaged_chunks"] == 0 and report["checked_chunks"] > 0
    assert cli.points()[0]["state"] == "verified"
    # --since skips what was just checked
    again = cli.run("verify", "--since", "2000-01-01", "--json", check=True).json()
    assert again["checked_chunks"] == 0 and again["skipped_chunks"] == report["checked_chunks"]
    sampled = cli.run("verify", "--sample", "50", "--json", check=True).json()
    assert 0 < sampled["checked_chunks"] < report["checked_chunks"]


def test_forget_dry_run_then_forget(cli, tmp_path):
    image = make_image(tmp_path / "disk.img", 8 << 20, seed=7)
    cli.run("init", "--encryption", "none", check=True)
    for seed in range(4):
        change_image(image, seed=100 + seed)
        cli.run("backup", str(image), "--name", "d", check=True)
    ids = [p["id"] for p in cli.points()]
    dry = cli.run("forget", "--keep-last", "2", "--dry-run", "--json", check=True).json()
    assert [d["keep"] for d in dry["decisions"]] == [False, False, True, True]
    assert [p["id"] for p in cli.points()] == ids
    cli.run("forget", "--keep-last", "2", "--prune", check=True)
    assert [p["id"] for p in cli.points()] == ids[2:]
    out = tmp_path / "out.img"
    cli.run("restore", "d:latest", "--to", str(out), check=True)
    assert sha256_file(out) == sha256_file(image)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")
def test_block_device_backup_and_restore(cli, tmp_path):
    image = make_image(tmp_path / "dev.img", 32 << 20, seed=8)
    target_file = tmp_path / "target.img"
    target_file.write_bytes(b"\xff" * (32 << 20))  # garbage the restore must overwrite, zeros included
    loops = []
    try:
        for path in (image, target_file):
            loops.append(subprocess.check_output(["losetup", "-f", "--show", str(path)], text=True).strip())
        cli.run("init", "--encryption", "none", "--chunk-size", SMALL_CHUNKS, check=True)
        cli.run("backup", loops[0], "--name", "dev", check=True)
        cli.run("restore", "dev:latest", "--to", loops[1], check=True)
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
    assert sha256_file(target_file) == sha256_file(image)


@pytest.mark.s3
def test_change_passphrase_keeps_data(cli, tmp_path):
    image = make_image(tmp_path / "disk.img", 8 << 20, seed=9)
    cli.run("init", "--encryption", "aes-256-gcm", check=True)
    cli.run("backup", str(image), "--name", "d", check=True)
    cli.run("passwd", env={"SUREPOINT_NEW_PASSPHRASE": "a new one"}, check=True)
    old = cli.run("list")
    assert old.returncode == 1 and "wrong passphrase" in old.stderr
    new_env = {"SUREPOINT_PASSPHRASE": "a new one"}
    out = tmp_path / "out.img"
    cli.run("restore", "d:latest", "--to", str(out), env=new_env, check=True)
    assert sha256_file(out) == sha256_file(image)
    assert cli.run("verify", env=new_env).returncode == 0
    empty = cli.run("passwd", env={**new_env, "SUREPOINT_NEW_PASSPHRASE": ""})
    assert empty.returncode == 2 and "must not be empty" in empty.stderr
