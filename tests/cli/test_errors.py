"""What a user sees when a command cannot do its job: exit code, one error line, no traceback, no new point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import pytest

from tests.faultlib import MiB, Repo, make_image, no_target_left, root_only, sha256_file

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path, encryption="none")  # no key derivation: faster commands
    r.init()
    return r


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 4 * MiB, seed=11)


@pytest.fixture
def repo_with_point(repo: Repo, image) -> tuple[Repo, dict]:
    return repo, repo.backup(image[0], name="vm")


def test_wrong_passphrase(tmp_path: Path, image):
    repo = Repo(tmp_path, encryption="aes-256-gcm")
    repo.init()
    point = repo.backup(image[0], name="vm")
    wrong = repo.env(SUREPOINT_PASSPHRASE="not the passphrase")
    for args in (["list"], ["backup", str(image[0])], ["restore", point["id"], "--to", str(repo.base / "out.img")]):
        repo.fails(*args, code=1, words=["wrong passphrase"], env=wrong)
    no_target_left(repo.base / "out.img")
    # a passphrase file with the wrong passphrase is just as wrong
    pwfile = repo.base / "pw"
    pwfile.write_text("still wrong\n")
    env = repo.env()
    del env["SUREPOINT_PASSPHRASE"]
    repo.fails("--passphrase-file", str(pwfile), "list", code=1, words=["wrong passphrase"], env=env)
    assert repo.point_ids() == [point["id"]]


def test_missing_repository(tmp_path: Path, image):
    r = Repo(tmp_path, repo=tmp_path / "no-such-repo")
    repo_arg = ["--repo", str(r.path)]
    r.fails(*repo_arg, "list", code=1, words=["no repository", str(r.path)])
    r.fails(*repo_arg, "backup", str(image[0]), code=1, words=["no repository"])
    assert not r.path.exists()
    # no repository given at all is a usage error
    env = r.env()
    del env["SUREPOINT_REPO"]
    r.fails("list", code=2, words=["--repo"], env=env)


def test_directory_that_is_not_a_repository(tmp_path: Path, image):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello\n")
    (other / "config").write_text("not json {")
    for d, words in ((empty, ["not a surepoint repository"]), (other, ["config is unreadable"])):
        r = Repo(tmp_path, repo=d)
        r.fails("list", code=1, words=[str(d), *words])
        r.fails("backup", str(image[0]), code=1, words=[str(d), *words])
    assert os.listdir(empty) == []
    assert sorted(os.listdir(other)) == ["config", "notes.txt"]


def test_init_refuses_non_empty_dir_and_existing_repository(tmp_path: Path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me\n")
    r = Repo(tmp_path, repo=target)
    r.fails("init", "--chunk-size", "65536", code=2, words=["not empty"])
    assert os.listdir(target) == ["precious.txt"]

    r2 = Repo(tmp_path, encryption="none")
    r2.init()
    config = (r2.path / "config").read_bytes()
    r2.fails("init", code=2, words=["already exists"])
    assert (r2.path / "config").read_bytes() == config
    assert r2.points() == []


def test_backup_source_missing(repo_with_point, tmp_path: Path):
    repo, point = repo_with_point
    missing = tmp_path / "no-such-disk.img"
    repo.fails("backup", str(missing), code=1, words=["does not exist", str(missing)])
    # paths with brackets are printed literally (they are not console markup)
    odd = tmp_path / "vm [disk].img"
    repo.fails("backup", str(odd), code=1, words=[str(odd)])
    odd2 = tmp_path / "vm [/].img"
    repo.fails("backup", str(odd2), code=1, words=[str(odd2)])
    assert repo.point_ids() == [point["id"]]
    assert repo.locks() == []


def test_names_with_brackets_are_shown_literally(repo: Repo, image):
    # names come from users: they are printed as they are, never read as console markup
    result = repo.run("backup", str(image[0]), "--name", "db[/]")
    assert result.returncode == 0, str(result)
    assert "db[/]" in repo.ok("list").stdout


def test_backup_source_is_directory(repo_with_point, tmp_path: Path):
    repo, point = repo_with_point
    d = tmp_path / "a-directory"
    d.mkdir()
    line = repo.fails("backup", str(d), code=1, words=[str(d)])
    assert "directory" in line or "not a regular file" in line, line
    assert repo.point_ids() == [point["id"]]


@pytest.mark.root
@root_only
def test_backup_source_unreadable():
    # root reads anything, so the backup runs as nobody; pytest's tmp dirs are private to root.
    shared = Path(tempfile.mkdtemp(prefix="surepoint-nobody-", dir="/tmp"))
    try:
        shared.chmod(0o777)
        r = Repo(shared / "work", encryption="none")
        (shared / "work").chmod(0o777)
        r.prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run(r.argv(["version"]), capture_output=True, text=True, env=r.env())
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run surepoint here: {probe.stderr.strip()}")
        r.init()
        readable = shared / "readable.img"
        sha = make_image(readable, 2 * MiB, seed=5)
        readable.chmod(0o644)
        first = r.backup(readable, name="vm")
        secret = shared / "secret.img"
        make_image(secret, 2 * MiB, seed=6)
        secret.chmod(0o000)
        r.fails("backup", str(secret), "--name", "vm", code=1, words=["not readable", str(secret)])
        assert r.point_ids() == [first["id"]]
        assert r.locks() == []
        r.restore_matches(first["id"], sha, shared / "work" / "back.img")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.root
@root_only
def test_restore_target_too_small(repo_with_point, image, tmp_path: Path):
    repo, point = repo_with_point
    backing = tmp_path / "small-device"
    with open(backing, "wb") as f:
        f.truncate(1 * MiB)
    try:
        device = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"no loop device: {exc}")
    try:
        repo.fails("restore", point["id"], "--to", device, code=1, words=["too small", device])
        with open(device, "rb") as f:
            assert f.read() == bytes(1 * MiB), "a refused restore wrote to the device"
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    assert repo.point_ids() == [point["id"]]

    # the same restore to a device of the right size works
    with open(backing, "wb") as f:
        f.truncate(image[0].stat().st_size)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        # fill the device with garbage: the restore must write zero chunks too
        with open(device, "r+b") as f:
            f.write(b"\xa5" * image[0].stat().st_size)
        repo.ok("restore", point["id"], "--to", device)
        assert sha256_file(device) == image[1]
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_restore_to_existing_file_needs_overwrite(repo_with_point, image, tmp_path: Path):
    repo, point = repo_with_point
    target = tmp_path / "existing.img"
    target.write_bytes(b"user data that must survive\n")
    repo.fails("restore", point["id"], "--to", str(target), code=1, words=["already exists", "--overwrite"])
    assert target.read_bytes() == b"user data that must survive\n"
    assert not (tmp_path / "existing.img.surepoint-partial").exists()
    repo.ok("restore", point["id"], "--to", str(target), "--overwrite")
    assert sha256_file(target) == image[1]
    # a directory as target is refused
    d = tmp_path / "dir-target"
    d.mkdir()
    repo.fails("restore", point["id"], "--to", str(d), code=1, words=["directory"])
    # a target in a directory that does not exist
    repo.fails("restore", point["id"], "--to", str(tmp_path / "nowhere" / "x.img"), code=1, words=["does not exist"])
    assert repo.point_ids() == [point["id"]]


def test_unknown_restore_point(repo_with_point, tmp_path: Path):
    repo, point = repo_with_point
    target = tmp_path / "out.img"
    unknown = "ffffffffffffffff" if not point["id"].startswith("f") else "0000000000000000"
    repo.fails("restore", unknown, "--to", str(target), code=1, words=["no restore point", unknown])
    repo.fails("restore", "nosuchname:latest", "--to", str(target), code=1, words=["nosuchname"])
    repo.fails("verify", unknown, code=1, words=["no restore point"])
    repo.fails("show", unknown, code=1, words=["no restore point"])
    repo.fails("restore", point["id"], "--disk", "3", "--to", str(target), code=2, words=["no disk 3"])
    no_target_left(target)
    assert repo.point_ids() == [point["id"]]


def test_ambiguous_prefix_is_usage_error(repo: Repo, image, tmp_path: Path):
    ids: list[str] = []
    prefix = None
    # ids are random hex: by the pigeonhole principle 17 points surely share a first digit
    for _ in range(17):
        ids.append(repo.backup(image[0], name="vm")["id"])
        firsts = [i[0] for i in ids]
        prefix = next((c for c in firsts if firsts.count(c) > 1), None)
        if prefix:
            break
    assert prefix is not None
    target = tmp_path / "out.img"
    line = repo.fails("restore", prefix, "--to", str(target), code=2, words=["ambiguous"])
    for i in ids:
        if i.startswith(prefix):
            assert i in line
    no_target_left(target)
    # a longer, unique prefix works
    chosen = next(i for i in ids if i.startswith(prefix))
    repo.restore_matches(chosen[:12], image[1])
    assert repo.point_ids() == sorted(ids, key=lambda i: ids.index(i))


def test_forget_without_keep_rule_is_usage_error(repo_with_point, image):
    repo, point = repo_with_point
    second = repo.backup(image[0], name="vm")
    repo.fails("forget", code=2, words=["--keep"])
    repo.fails("forget", "--name", "vm", "--prune", code=2, words=["--keep"])
    repo.fails("forget", "--keep-last", "0", code=2, words=["--keep"])
    assert repo.point_ids() == [point["id"], second["id"]]


def test_name_latest_resolution(repo: Repo, tmp_path: Path):
    a1 = tmp_path / "a1.img"
    a2 = tmp_path / "a2.img"
    b1 = tmp_path / "b1.img"
    sha_a1 = make_image(a1, 3 * MiB, seed=21)
    sha_a2 = make_image(a2, 3 * MiB, seed=22)
    sha_b1 = make_image(b1, 2 * MiB, seed=23)
    repo.backup(a1, name="alpha")
    second = repo.backup(a2, name="alpha")
    beta = repo.backup(b1, name="beta")
    repo.restore_matches("alpha:latest", sha_a2)
    repo.restore_matches("beta:latest", sha_b1)
    repo.restore_matches("latest", sha_b1)
    assert repo.ok("show", "alpha:latest", "--json").json()["id"] == second["id"]
    assert repo.ok("show", "beta:latest", "--json").json()["id"] == beta["id"]
    assert [p["name"] for p in repo.ok("list", "--json", "--name", "alpha").json()["restore_points"]] == ["alpha"] * 2
    assert sha_a1 != sha_a2


def test_list_json_fields(repo_with_point, image):
    repo, point = repo_with_point
    result = repo.ok("list", "--json")
    data = json.loads(result.stdout)
    assert data["damaged_manifests"] == []
    (entry,) = data["restore_points"]
    for field in ("id", "name", "created", "disks", "consistency", "state", "size"):
        assert field in entry, field
    assert entry["id"] == point["id"]
    assert len(entry["id"]) == 16 and int(entry["id"], 16) >= 0
    assert entry["name"] == "vm"
    assert datetime.fromisoformat(entry["created"].replace("Z", "+00:00")).tzinfo is not None
    assert entry["consistency"] == "crash"
    assert entry["state"] == "unverified"
    assert entry["size"] == image[0].stat().st_size
    assert [d["size"] for d in entry["disks"]] == [image[0].stat().st_size]
    repo.verify_clean()
    assert repo.points()[0]["state"] == "verified"
