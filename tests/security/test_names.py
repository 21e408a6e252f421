"""Names cannot collide silently: two different files called disk.img are never one chain."""

from __future__ import annotations

from tests.conftest import make_image

MiB = 1 << 20


def test_same_file_name_from_another_path_needs_a_name_of_its_own(cli, tmp_path):
    cli.run("init", "--encryption", "none", check=True)
    web = make_image((tmp_path / "a" / "web01").mkdir(parents=True) or tmp_path / "a" / "web01" / "disk.img", 2 * MiB)
    db = make_image(
        (tmp_path / "b" / "db01").mkdir(parents=True) or tmp_path / "b" / "db01" / "disk.img", 2 * MiB, seed=2
    )
    cli.run("backup", str(web), check=True)
    cli.run("backup", str(web), check=True)  # the same file again: the same chain
    refused = cli.run("backup", str(db))
    assert refused.returncode == 2
    assert str(web) in refused.stderr and str(db) in refused.stderr and "--name" in refused.stderr
    assert [p["name"] for p in cli.points()] == ["disk.img", "disk.img"]
    # forget --keep-last 1 can no longer take web01's only backup for db01's
    cli.run("backup", str(db), "--name", "db01", check=True)
    cli.run("forget", "--keep-last", "1", check=True)
    assert sorted(p["name"] for p in cli.points()) == ["db01", "disk.img"]
    # an explicit --name continues a chain on purpose (a disk moved to a new path)
    moved = tmp_path / "moved.img"
    moved.write_bytes(web.read_bytes())
    cli.run("backup", str(moved), "--name", "disk.img", check=True)
