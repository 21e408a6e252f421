"""Faults a repository meets in real life: a full disk, a killed backup, flipped bits, lost or cut objects.

After each fault the user must be able to tell what is damaged (verify exit 3 naming points and byte ranges),
must never get silently wrong data from restore, and must keep every undamaged restore point restorable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faultlib import (
    CHUNK,
    MiB,
    Repo,
    make_image,
    make_random_image,
    no_target_left,
    root_only,
    sha256_file,
    temporary_files,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)
ENCRYPTIONS = ["none", "aes-256-gcm"]


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> tuple[Path, str]:
    """256 MiB of random bytes: 4096 new 64 KiB chunks, a backup of a second or more."""
    path = tmp_path_factory.mktemp("big") / "big.img"
    return path, make_random_image(path, 256 * MiB, seed=1234)


# ---------------------------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str):
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill_up(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\xff" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
    return filler


@pytest.mark.root
@root_only
def test_disk_full_during_backup(tmp_path: Path):
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        repo = Repo(tmp_path, repo=mnt / "repo")
        repo.init()
        small = tmp_path / "small.img"
        small_sha = make_image(small, 2 * MiB, seed=3)
        first = repo.backup(small, name="small")
        big = tmp_path / "big.img"
        big_sha = make_random_image(big, 32 * MiB, seed=4)

        repo.fails("backup", str(big), "--name", "big", code=1, words=["full"])
        assert repo.point_ids() == [first["id"]]
        assert repo.locks() == [], "the failed backup left its lock behind"
        assert temporary_files(repo) == [], "the failed backup left temporary files behind"
        events = repo.ok("events", "--json").json()
        assert any(e["outcome"] == "failed" and "full" in e["message"] for e in events), events

        # completely full now: reading must still work
        filler = fill_up(mnt)
        repo.verify_clean()
        repo.restore_matches(first["id"], small_sha)

        # free space: the next backup works and everything checks out
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        second = repo.backup(big, name="big")
        assert repo.point_ids() == [first["id"], second["id"]]
        repo.verify_clean()
        repo.restore_matches(second["id"], big_sha)
        repo.restore_matches(first["id"], small_sha)


@pytest.mark.root
@root_only
def test_read_only_repository_still_restores(tmp_path: Path):
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        repo = Repo(tmp_path, repo=mnt / "repo")
        repo.init()
        img = tmp_path / "vm.img"
        sha = make_image(img, 4 * MiB, seed=7)
        point = repo.backup(img, name="vm")["id"]
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        repo.verify_clean()
        repo.restore_matches(point, sha)
        repo.fails("backup", str(img), "--name", "vm", code=1, words=["read-only"])
        assert repo.point_ids() == [point]


# ---------------------------------------------------------------------------------------------- kill -9


def new_index_written(repo: Repo, before: set[str]):
    def check() -> bool:
        return bool(set(os.listdir(repo.path / "indexes")) - before)

    return check


@pytest.mark.parametrize("moment", ["0.05", "0.2", "0.5", "commit"])
def test_kill_backup(tmp_path: Path, big_image, moment: str):
    image, image_sha = big_image
    repo = Repo(tmp_path, encryption="aes-256-gcm" if moment in ("0.2", "commit") else "none")
    repo.init()
    small = tmp_path / "small.img"
    small_sha = make_image(small, 4 * MiB, seed=int(float(moment) * 100) if moment != "commit" else 99)
    earlier = repo.backup(small, name="vm")
    shas = {earlier["id"]: small_sha}

    indexes_before = set(os.listdir(repo.path / "indexes"))
    proc = repo.popen("backup", str(image), "--name", "vm")
    try:
        if moment == "commit":
            seen = wait_for(new_index_written(repo, indexes_before), timeout=120, interval=0.0005)
            assert seen or proc.poll() is not None
        else:
            time.sleep(float(moment))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    killed = proc.returncode == -signal.SIGKILL

    points = repo.points()
    ids = [p["id"] for p in points]
    assert ids[0] == earlier["id"]
    assert len(ids) in (1, 2)
    if len(ids) == 2:  # killed just after the commit: the point is whole
        assert moment == "commit" or not killed
        shas[ids[1]] = image_sha
    # the repository is consistent: every committed point verifies and restores
    repo.verify_clean()
    for point_id, sha in shas.items():
        repo.restore_matches(point_id, sha)

    # the dead process's lock does not block the next backup (no manual unlock)
    stale = repo.locks()
    if moment == "commit" and killed:
        assert len(stale) == 1, "the killed backup held a lock"
    after = repo.backup(image, name="vm")
    shas[after["id"]] = image_sha
    assert repo.point_ids() == list(shas)
    unlock = repo.ok("unlock")
    assert f"removed {len(stale)} stale lock(s); 0 lock(s) still held" in unlock.stdout, unlock.stdout
    assert repo.locks() == []
    repo.restore_matches(after["id"], image_sha)

    # garbage collection clears what the killed backup left, and keeps what the points need
    repo.ok("gc", "--grace", "0")
    assert temporary_files(repo) == []
    assert sorted(os.listdir(repo.path / "indexes")) == sorted(f"{i}.0" for i in shas)
    repo.verify_clean()
    repo.restore_matches(earlier["id"], small_sha)


# ---------------------------------------------------------------------------------------------- damage


def merged_ranges(names: list[str | None], damaged: set[str], chunk: int, size: int) -> list[tuple[int, int]]:
    """(first byte, last byte) of the runs of chunks whose object is damaged."""
    ranges: list[list[int]] = []
    for number, name in enumerate(names):
        if name in damaged:
            start, end = number * chunk, min(size, (number + 1) * chunk) - 1
            if ranges and ranges[-1][1] + 1 == start:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])
    return [(a, b) for a, b in ranges]


@pytest.fixture(params=ENCRYPTIONS)
def three_points(request, tmp_path: Path):
    """A repository with points p1 and p2 (same image, shared chunks) and p3 (another image)."""
    repo = Repo(tmp_path, encryption=request.param)
    repo.init()
    img = tmp_path / "vm.img"
    sha = make_image(img, 8 * MiB, seed=31, random_share=0.6)
    other = tmp_path / "other.img"
    other_sha = make_image(other, 4 * MiB, seed=32)
    p1 = repo.backup(img, name="vm")["id"]
    p2 = repo.backup(img, name="vm")["id"]
    p3 = repo.backup(other, name="other")["id"]
    return repo, {"p1": p1, "p2": p2, "p3": p3}, {p1: sha, p2: sha, p3: other_sha}, img


def verify_damage(repo: Repo) -> dict:
    result = repo.run("verify", "--json")
    assert result.returncode == 3, str(result)
    return result.json()


def test_flipped_byte_in_chunk(three_points, tmp_path: Path):
    repo, ids, shas, img = three_points
    size = img.stat().st_size
    names = repo.chunk_names(ids["p1"])
    unique = [n for n in names if n is not None and names.count(n) == 1]
    victim = unique[len(unique) // 2]  # a chunk in the middle of the disk, used once
    assert victim not in repo.chunk_names(ids["p3"])
    number = names.index(victim)
    first, last = number * CHUNK, number * CHUNK + CHUNK - 1

    path = repo.path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    # the text report names the damaged points and the byte range
    result = repo.run("verify")
    assert result.returncode == 3, str(result)
    for p in ("p1", "p2"):
        assert f"{ids[p]} vm: damaged" in result.stdout, result.stdout
    assert f"{ids['p3']} other: verified" in result.stdout, result.stdout
    assert f"disk 0 bytes {first}-{last}:" in result.stdout, result.stdout
    report = verify_damage(repo)
    by_id = {p["id"]: p for p in report["points"]}
    for p in ("p1", "p2"):
        assert by_id[ids[p]]["state"] == "damaged"
        assert [(r["disk"], r["offset"], r["length"]) for r in by_id[ids[p]]["damaged"]] == [(0, first, CHUNK)]
    assert by_id[ids["p3"]]["state"] == "verified"
    states = {p["id"]: p["state"] for p in repo.points()}
    assert states == {ids["p1"]: "damaged", ids["p2"]: "damaged", ids["p3"]: "verified"}

    # restore refuses, says where, and leaves nothing named like the target
    target = tmp_path / "restored.img"
    line = repo.fails("restore", ids["p1"], "--to", str(target), code=3, words=[f"bytes {first}-{last}"])
    assert ids["p1"] in line
    no_target_left(target)
    repo.fails("restore", "vm:latest", "--to", str(target), code=3, words=[f"bytes {first}-{last}"])
    no_target_left(target)
    # an existing target is left as it was by a refused --overwrite restore
    target.write_bytes(b"previous contents\n")
    repo.fails("restore", ids["p2"], "--to", str(target), "--overwrite", code=3, words=["damaged"])
    assert target.read_bytes() == b"previous contents\n"
    target.unlink()
    # the undamaged point still restores
    repo.restore_matches(ids["p3"], shas[ids["p3"]])

    # a chunk used at many places: every place is reported, adjacent ones as one range
    shared = max((n for n in set(names) if n is not None), key=names.count)
    assert names.count(shared) > 1
    flip_middle(repo.path / shared)
    report = verify_damage(repo)
    got = [
        (r["offset"], r["offset"] + r["length"] - 1)
        for p in report["points"]
        if p["id"] == ids["p1"]
        for r in p["damaged"]
    ]
    assert got == merged_ranges(names, {victim, shared}, CHUNK, size)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("three_points", ["aes-256-gcm"], indirect=True)
def test_truncated_index(three_points, tmp_path: Path):
    repo, ids, shas, _img = three_points
    index = repo.path / "indexes" / f"{ids['p1']}.0"
    os.truncate(index, index.stat().st_size - 5)
    chunks_before = sorted(p.name for p in (repo.path / "chunks").rglob("*") if p.is_file())

    result = repo.run("verify")
    assert result.returncode == 3, str(result)
    assert f"{ids['p1']} vm: damaged" in result.stdout, result.stdout
    assert f"{ids['p2']} vm: verified" in result.stdout, result.stdout
    report = verify_damage(repo)
    (bad,) = [p for p in report["points"] if p["state"] == "damaged"]
    assert bad["id"] == ids["p1"]
    assert "index" in bad["damaged"][0]["reason"]

    target = tmp_path / "restored.img"
    line = repo.fails("restore", ids["p1"], "--to", str(target), code=3, words=["index"])
    assert ids["p1"] in line
    no_target_left(target)
    repo.restore_matches(ids["p2"], shas[ids["p2"]])
    repo.restore_matches(ids["p3"], shas[ids["p3"]])

    # gc cannot know what the damaged point needs: it must refuse and delete nothing
    repo.fails("gc", "--grace", "0", code=3, words=[ids["p1"]])
    assert sorted(p.name for p in (repo.path / "chunks").rglob("*") if p.is_file()) == chunks_before


@pytest.mark.parametrize("three_points", ["none"], indirect=True)
def test_missing_chunk(three_points, tmp_path: Path):
    repo, ids, shas, img = three_points
    names = repo.chunk_names(ids["p1"])
    victim = next(n for n in reversed(names) if n is not None and names.count(n) == 1)
    number = names.index(victim)
    first, last = number * CHUNK, number * CHUNK + CHUNK - 1
    (repo.path / victim).unlink()

    result = repo.run("verify")
    assert result.returncode == 3, str(result)
    chunk_hex = victim.rsplit("/", 1)[1]
    assert f"disk 0 bytes {first}-{last}: chunk {chunk_hex[:16]} is missing" in result.stdout, result.stdout
    assert f"{ids['p1']} vm: damaged" in result.stdout and f"{ids['p2']} vm: damaged" in result.stdout
    assert f"{ids['p3']} other: verified" in result.stdout

    target = tmp_path / "restored.img"
    repo.fails("restore", ids["p2"], "--to", str(target), code=3, words=["missing", f"bytes {first}-{last}"])
    no_target_left(target)
    repo.restore_matches(ids["p3"], shas[ids["p3"]])

    # backing up the same data again stores the chunk again, which heals the older points too
    p4 = repo.backup(img, name="vm")["id"]
    assert (repo.path / victim).exists()
    repo.verify_clean()
    for point in (ids["p1"], p4):
        repo.restore_matches(point, sha256_file(img))


@pytest.mark.root
@root_only
@pytest.mark.parametrize("three_points", ["none"], indirect=True)
def test_restore_of_damaged_point_to_block_device_stops(three_points, tmp_path: Path):
    """Damage found while writing a device: exit 3 and the offset, even though the device was written to."""
    repo, ids, _shas, img = three_points
    names = repo.chunk_names(ids["p1"])
    victim = next(n for n in names if n is not None and names.count(n) == 1)
    number = names.index(victim)
    flip_middle(repo.path / victim)
    backing = tmp_path / "device"
    with open(backing, "wb") as f:
        f.truncate(img.stat().st_size)
    try:
        device = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"no loop device: {exc}")
    try:
        damaged = f"bytes {number * CHUNK}-{number * CHUNK + CHUNK - 1}"
        repo.fails("restore", ids["p1"], "--to", device, code=3, words=[damaged])
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
