"""Change signals: a point whose changed data suddenly stops compressing is flagged, normal churn is not."""

from __future__ import annotations

import os
import random

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from surepoint.repo.manifest import DiskRecord, RestorePoint
from surepoint.scan.signals import suspicious_points

MiB = 1 << 20


def point(n: int, new: int, stored: int, name: str = "web01", size: int = 4 << 30) -> RestorePoint:
    disk = DiskRecord(0, "vda", size, MiB, "i", new_bytes=new, stored_bytes=stored)
    return RestorePoint(f"p{n:02d}", name, f"2026-01-{n + 1:02d}T00:00:00Z", {}, [disk])


def test_encrypted_looking_change_after_compressible_history_is_flagged():
    history = [point(0, 2000 * MiB, 900 * MiB)] + [point(i, 40 * MiB, 15 * MiB) for i in range(1, 8)]
    attack = point(8, 600 * MiB, 601 * MiB)
    flagged = suspicious_points([*history, attack])
    assert list(flagged) == ["p08"]
    assert "600 MiB of changed data does not compress" in flagged["p08"]


def test_normal_churn_is_not_flagged():
    points = [point(0, 2000 * MiB, 900 * MiB)]
    rng = random.Random(5)
    for i in range(1, 30):  # package upgrades, logs, databases: mixed ratios, some days incompressible but small
        new = rng.choice([2, 10, 50, 200]) * MiB
        ratio = rng.choice([0.3, 0.45, 0.6, 0.8, 1.0 if new <= 10 * MiB else 0.7])
        points.append(point(i, new, int(new * ratio)))
    assert suspicious_points(points) == {}


def test_a_system_whose_data_never_compressed_is_not_flagged():
    points = [point(0, 2000 * MiB, 1990 * MiB)] + [point(i, 300 * MiB, 299 * MiB) for i in range(1, 5)]
    assert suspicious_points(points) == {}


def test_small_changes_and_first_backups_are_not_judged():
    assert suspicious_points([point(0, 3000 * MiB, 3000 * MiB)]) == {}
    assert suspicious_points([point(0, 100 * MiB, 30 * MiB), point(1, 8 * MiB, 8 * MiB)]) == {}


def test_each_system_is_compared_with_its_own_history():
    media = [point(i, 500 * MiB, 499 * MiB, name="media") for i in range(4)]
    db = [point(i + 10, 300 * MiB, 100 * MiB, name="db") for i in range(4)] + [point(20, 300 * MiB, 300 * MiB, "db")]
    assert list(suspicious_points([*media, *db])) == ["p20"]


# --- through the command line: backups of an image changed normally, then encrypted in place ----------


def write_regions(path, regions: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for offset, data in regions.items():
            f.seek(offset)
            f.write(data)


def test_list_and_show_flag_the_encrypted_backup(cli, tmp_path):
    rng = random.Random(3)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]

    def text(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        return bytes(out[:n])

    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    files = {i * 2 * MiB: text(2 * MiB) for i in range(16)}  # 32 MiB of documents
    write_regions(image, files)
    cli.run("init", "--encryption", "aes-256-gcm", "--chunk-size", "262144", check=True)
    cli.run("backup", str(image), "--name", "office", check=True)
    for day in range(3):  # edits, appends: compressible churn
        write_regions(image, {offset + rng.randrange(0, MiB): text(64 << 10) for offset in list(files)[day::3]})
        cli.run("backup", str(image), "--name", "office", check=True)
    key, nonce = os.urandom(32), os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    write_regions(image, {offset: encryptor.update(data) for offset, data in files.items()})  # in place
    cli.run("backup", str(image), "--name", "office", check=True)

    points = cli.points()
    assert [p["suspicious"] is not None for p in points] == [False, False, False, False, True]
    listing = cli.run("list", check=True)
    assert "suspicious" in listing.stdout and "does not compress" in listing.stderr
    shown = cli.run("show", points[-1]["id"], "--json", check=True).json()
    assert "does not compress" in shown["suspicious"]
    assert cli.run("show", points[-2]["id"], "--json", check=True).json()["suspicious"] is None


def test_zero_blocks_in_new_chunks_do_not_hide_ciphertext():
    """A chunk that is half ciphertext, half free space (zeros, not read) stores at about half its size."""
    history = [point(0, 2000 * MiB, 900 * MiB)] + [point(i, 40 * MiB, 15 * MiB) for i in range(1, 8)]
    attack = point(8, 200 * MiB, 101 * MiB)
    assert suspicious_points([*history, attack]) == {}  # diluted by the zeros
    attack.disks[0].metadata["new_zero_bytes"] = 100 * MiB
    assert list(suspicious_points([*history, attack])) == ["p08"]


def test_zero_blocks_are_counted_aligned():
    from surepoint.repo.backup import zero_block_bytes

    data = os.urandom(4096) + bytes(8192) + b"\x01" + bytes(4095) + bytes(4096)
    assert zero_block_bytes(data) == 3 * 4096
    assert zero_block_bytes(bytes(MiB)) == MiB
    assert zero_block_bytes(os.urandom(MiB)) == 0
