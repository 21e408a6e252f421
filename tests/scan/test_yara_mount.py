"""`surepoint scan` on real restore points: a GPT disk with two ext4 filesystems, mounted read-only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.mount.conftest import LINUX_FS, MiB, needs_root_and_tools, write_gpt
from tests.scan.test_yara import HARMLESS, MARKER, RULES

pytestmark = [*needs_root_and_tools(), pytest.mark.slow]


def _disk(image: Path, tmp_path: Path, infected: bool) -> None:
    """GPT: a root ext4 whose /etc/fstab mounts the second ext4 (label SPDATA) at /srv/data."""
    size = 40 * MiB
    write_gpt(image, size, [(LINUX_FS, 2048, 2048 + 32767, "root"), (LINUX_FS, 36864, 36864 + 8191, "data")])
    root = tmp_path / "root-tree"
    if not root.exists():
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "fstab").write_text(
            "# guest fstab\nLABEL=SPROOT / ext4 defaults 0 1\nLABEL=SPDATA /srv/data ext4 defaults 0 2\n"
        )
        (root / "bin").mkdir()
        (root / "bin" / "tool").write_bytes(os.urandom(100_000))
    data = tmp_path / ("data-infected" if infected else "data-clean")
    data.mkdir()
    (data / "report.doc").write_bytes(b"quarterly numbers\n" * 1000)
    if infected:
        (data / "README-RECOVER.txt").write_bytes(b"pay up. " + MARKER)
    for staging, offset, fsize, label in ((root, MiB, 16 * MiB, "SPROOT"), (data, 18 * MiB, 4 * MiB, "SPDATA")):
        argv = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-d",
            str(staging),
            "-L",
            label,
            "-E",
            f"offset={offset}",
            str(image),
            f"{fsize // 1024}k",
        ]
        subprocess.run(argv, check=True, capture_output=True)


def test_scan_and_find_clean(mcli, tmp_path: Path):
    rules = tmp_path / "ransom.yar"
    rules.write_text(RULES)
    image = tmp_path / "disk.img"
    _disk(image, tmp_path, infected=False)
    mcli.run("init", "--encryption", "none", check=True)
    mcli.run("backup", str(image), "--name", "web", check=True)
    _disk(image, tmp_path, infected=True)
    mcli.run("backup", str(image), "--name", "web", check=True)
    first, second = (p["id"] for p in mcli.points())

    hit = mcli.run("scan", "web:latest", "--yara", str(rules))
    assert hit.returncode == 5, hit.stderr
    assert "MATCH /srv/data/README-RECOVER.txt: ransom_note" in hit.stdout
    as_json = mcli.run("scan", second, "--yara", str(rules), "--json")
    assert as_json.returncode == 5
    data = as_json.json()
    assert data["outcome"] == "match" and data["matches"] == [
        {"path": "/srv/data/README-RECOVER.txt", "rules": ["ransom_note"]}
    ]
    assert {v["guest_mount"] for v in data["volumes"]} == {"/", "/srv/data"}
    assert data["files"] == 4

    ok = mcli.run("scan", first, "--yara", str(rules))
    assert ok.returncode == 0, ok.stderr
    assert f"{first}: clean" in ok.stdout
    harmless = tmp_path / "harmless.yar"
    harmless.write_text(HARMLESS)

    # the recorded match of the newest point is enough to pass over it
    recorded = mcli.run("scan", "--find-clean", "web")
    assert recorded.returncode == 0 and recorded.stdout.strip() == first, recorded.stderr
    scanned = mcli.run("scan", "--find-clean", "web", "--yara", str(rules), "--json")
    assert scanned.returncode == 0
    assert scanned.json()["clean"] == first
    assert [p["restore_point"] for p in scanned.json()["passed_over"]] == [second]
    # a new scan with rules that find nothing is recorded too: the newest point is clean again
    assert mcli.run("scan", second, "--yara", str(harmless)).returncode == 0
    assert mcli.run("scan", "--find-clean", "web").stdout.strip() == second
    assert mcli.run("scan", "--find-clean", "nosuch").returncode == 1
