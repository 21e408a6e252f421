"""A repository is private by default; readers are protected from forget; damaged manifests are told."""

from __future__ import annotations

import os
import stat

from tests.conftest import make_image

MiB = 1 << 20


def test_repository_files_are_private_whatever_the_umask(cli, tmp_path):
    old = os.umask(0)
    try:
        cli.run("init", "--encryption", "none", check=True)
        cli.run("backup", str(make_image(tmp_path / "disk.img", 2 * MiB)), "--name", "disk", check=True)
    finally:
        os.umask(old)
    for dirpath, _dirnames, filenames in os.walk(cli.repo):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600, name


def test_a_damaged_newest_manifest_is_told_not_skipped(cli, tmp_path):
    cli.run("init", "--encryption", "none", check=True)
    image = make_image(tmp_path / "disk.img", 2 * MiB)
    first = cli.run("backup", str(image), "--name", "disk", "--json", check=True).json()["id"]
    second = cli.run("backup", str(image), "--name", "disk", "--json", check=True).json()["id"]
    (cli.repo / "restorepoints" / second).write_bytes(b"damaged")
    listed = cli.run("list", "--json")
    assert listed.returncode == 3
    assert [p["id"] for p in listed.json()["restore_points"]] == [first]  # the good one is still listed
    assert listed.json()["damaged_manifests"] == [f"restorepoints/{second}"]
    latest = cli.run("restore", "disk:latest", "--to", str(tmp_path / "r.img"))
    assert latest.returncode == 3 and f"restorepoints/{second}" in latest.stderr
    assert not (tmp_path / "r.img").exists()
    cli.run("restore", first, "--to", str(tmp_path / "r.img"), check=True)  # by id it still works


def test_forget_refuses_while_a_restore_reads(cli, tmp_path):
    from surepoint.repo.locks import repository_lock
    from surepoint.storage.local import LocalBackend

    cli.run("init", "--encryption", "none", check=True)
    image = make_image(tmp_path / "disk.img", 2 * MiB)
    cli.run("backup", str(image), "--name", "disk", check=True)
    cli.run("backup", str(image), "--name", "disk", check=True)
    oldest = cli.points()[0]["id"]
    backend = LocalBackend(str(cli.repo))
    with repository_lock(backend, "restore", points=[oldest], purpose="restore to /x"):  # a restore at work
        refused = cli.run("forget", "--keep-last", "1")
        assert refused.returncode == 1 and "restore (restore to /x) by pid" in refused.stderr
        assert oldest in refused.stderr and len(cli.points()) == 2
    cli.run("forget", "--keep-last", "1", check=True)
    assert len(cli.points()) == 1
