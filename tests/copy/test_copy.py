"""Backup copy jobs between local repositories: other keys and ciphers, interruption, retention of its own."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faultlib import MiB, Repo, make_image, make_random_image, sha256_file, wait_for

pytestmark = pytest.mark.timeout(300)


def write_at(path: Path, offset: int, data: bytes) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return sha256_file(path)


def copy(target: Repo, source: Repo, *args: str, fault: str | None = None):
    env = target.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase)
    if fault:
        env["SUREPOINT_FAULT"] = fault
    return target.run("copy", "--from", str(source.path), *args, env=env)


def copy_ok(target: Repo, source: Repo, *args: str) -> dict:
    result = copy(target, source, *args, "--json")
    assert result.returncode == 0, str(result)
    return result.json()


@pytest.fixture
def source(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path / "src", encryption="aes-256-gcm", passphrase="source secret")
    repo.init()
    return repo


def test_copy_to_other_keys_and_cipher(tmp_path: Path, source: Repo):
    image = tmp_path / "disk.img"
    first = make_image(image, 6 * MiB, seed=1)
    p1 = source.backup(image, name="web")
    second = write_at(image, 3 * MiB + 100, b"changed" * 100)
    p2 = source.backup(image, name="web")
    target = Repo(tmp_path / "dst", encryption="chacha20-poly1305", passphrase="target secret", catalog=source.catalog)
    target.init()

    result = copy_ok(target, source)
    assert [p["id"] for p in result["copied"]] == [p1["id"], p2["id"]]
    # The second point shares all but one or two chunks with the first: only those are read and sent.
    assert result["copied"][1]["sent_chunks"] <= 2
    assert result["copied"][1]["read_chunks"] <= 2

    # Bit-exact on the target, with the target's keys only; the ids are the target's own.
    target.restore_matches(p1["id"], first)
    target.restore_matches(p2["id"], second)
    source_chunks = {Path(n).name for n in source.chunk_names(p1["id"]) if n}
    target_chunks = {Path(n).name for n in target.chunk_names(p1["id"]) if n}
    assert source_chunks and not source_chunks & target_chunks, "chunk ids must be re-keyed on the target"

    points = {p["id"]: p for p in target.points()}
    assert points[p1["id"]]["consistency"] == p1["consistency"]
    assert points[p2["id"]]["state"] == "unverified"  # the target keeps its own verification records
    target.verify_clean()
    assert {p["state"] for p in source.points()} == {"unverified"}
    events = target.ok("events", p2["id"], "--json").json()
    assert any(e["component"] == "copy" and e["phase"] == "commit" and e["outcome"] == "ok" for e in events)

    # Nothing left to copy: a second run sends nothing.
    again = copy_ok(target, source)
    assert again["copied"] == [] and again["already_present"] == 2 and again["sent_bytes"] == 0


def test_copy_from_unencrypted_and_filters(tmp_path: Path):
    source = Repo(tmp_path / "src", encryption="none")
    source.init()
    image = tmp_path / "a.img"
    sha_a = make_image(image, 2 * MiB, seed=2)
    pa = source.backup(image, name="a")
    source.backup(image, name="b")
    target = Repo(tmp_path / "dst", encryption="aes-256-gcm")
    target.init()

    assert copy_ok(target, source, "--since", "2999-01-01")["copied"] == []
    result = copy_ok(target, source, "a", "--bandwidth", "100M")
    assert [p["id"] for p in result["copied"]] == [pa["id"]]
    target.restore_matches("a:latest", sha_a)
    assert [p["name"] for p in target.points()] == ["a"]


def test_copy_refuses_what_cannot_work(tmp_path: Path, source: Repo):
    other = Repo(tmp_path / "dst", encryption="none")
    other.init(chunk_size=2 * 65536)
    line = other.fails("copy", "--from", str(source.path), code=2, words=["chunk size"],
                       env=other.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase))  # fmt: skip
    assert "131072" in line
    source.fails("copy", "--from", str(source.path), code=2, words=["same repository"],
                 env=source.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase))  # fmt: skip
    target = Repo(tmp_path / "dst2", encryption="aes-256-gcm")
    target.init()
    target.fails("copy", "--from", str(source.path), code=1, words=["wrong passphrase", "source", "SUREPOINT_FROM"],
                 env=target.env(SUREPOINT_FROM_PASSPHRASE="not it"))  # fmt: skip
    wrong_target = target.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase, SUREPOINT_PASSPHRASE="not it")
    target.fails("copy", "--from", str(source.path), code=1, words=["wrong passphrase", "target"], env=wrong_target)
    target.fails("copy", "--from", str(source.path), code=2, words=["SUREPOINT_FROM_PASSPHRASE"])
    target.fails("copy", "--from", str(source.path), "--bandwidth", "fast", code=2, words=["size"],
                 env=target.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase))  # fmt: skip


def test_killed_copy_leaves_no_point_and_resumes(tmp_path: Path, source: Repo):
    image = tmp_path / "disk.img"
    sha = make_random_image(image, 3 * MiB, seed=3)  # 48 distinct chunks
    point = source.backup(image, name="db")
    target = Repo(tmp_path / "dst", encryption="aes-256-gcm", passphrase="other")
    target.init()

    killed = copy(target, source, fault="copy-after-chunks:20")
    assert killed.returncode == -signal.SIGKILL, str(killed)
    assert target.points() == []  # no half restore point
    already = [p for p in (target.path / "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    assert 20 <= len(already) < 48

    result = copy_ok(target, source)
    (stats,) = result["copied"]
    assert stats["chunks"] == 48
    assert stats["sent_chunks"] == 48 - len(already)  # only what was still missing
    assert stats["present_chunks"] == len(already)
    target.restore_matches(point["id"], sha)
    target.verify_clean()


def test_target_retention_is_its_own(tmp_path: Path, source: Repo):
    image = tmp_path / "disk.img"
    shas = [make_image(image, 2 * MiB, seed=4)]
    for i in range(2):
        source.backup(image, name="vm")
        shas.append(write_at(image, i * 65536, bytes([i + 1]) * 4096))
    source.backup(image, name="vm")
    target = Repo(tmp_path / "dst", encryption="none")
    target.init()
    copy_ok(target, source)
    ids = source.point_ids()
    assert target.point_ids() == ids

    target.ok("forget", "--keep-daily", "1", "--keep-monthly", "1", "--prune")  # GFS: one a day, one a month
    target.ok("gc", "--grace", "0")
    assert target.point_ids() == ids[-1:]
    assert source.point_ids() == ids  # the source keeps its own
    source.restore_matches(ids[0], shas[0])  # the oldest, gone from the target, is whole on the source
    target.restore_matches(ids[-1], shas[-1])

    # The points the target forgot are not brought back by the next run.
    again = copy_ok(target, source)
    assert again["copied"] == []
    assert {s["id"] for s in again["skipped"]} == set(ids[:-1])
    assert target.point_ids() == ids[-1:]


def test_copy_holds_off_forget_and_gc_of_what_it_reads(tmp_path: Path, source: Repo):
    """The copy holds a reader lock naming its points: gc on the source runs, forget keeps them
    (both at once, in tests/security/test_reader_locks.py, with the copy stopped at a checkpoint)."""
    image = tmp_path / "disk.img"
    make_random_image(image, 2 * MiB, seed=5)
    old = source.backup(image, name="vm")["id"]
    make_random_image(image, 2 * MiB, seed=6)
    new = source.backup(image, name="vm")["id"]
    target = Repo(tmp_path / "dst", encryption="none")
    target.init()
    env = target.env(SUREPOINT_FROM_PASSPHRASE=source.passphrase)
    proc = target.popen("copy", "--from", str(source.path), "--bandwidth", "64K", "--workers", "1", env=env)
    try:
        assert wait_for(lambda: source.locks(), timeout=30)
        source.ok("gc", "--grace", "0")
        source.fails("forget", "--keep-last", "1", code=1, words=["being read", "copy", old])
    finally:
        proc.kill()
        proc.wait()
    assert source.point_ids() == [old, new] and target.points() == []


def test_copy_to_an_append_only_ssh_server_and_back(sshd, tmp_path: Path, source: Repo):
    image = tmp_path / "disk.img"
    sha = make_image(image, 3 * MiB, seed=6)
    point = source.backup(image, name="app")
    offsite_dir = tmp_path / "offsite"
    ssh_env = sshd.append_only_client(offsite_dir)
    offsite = Repo(tmp_path / "offsite-client", encryption="chacha20-poly1305", passphrase="offsite")
    offsite_url = sshd.url("/ignored/by/the/forced/command")
    offsite_env = offsite.env(SUREPOINT_REPO=offsite_url, **ssh_env)
    offsite.ok("init", "--encryption", "chacha20-poly1305", "--chunk-size", "65536", env=offsite_env)

    env = {**offsite_env, "SUREPOINT_FROM_PASSPHRASE": source.passphrase}
    sent = offsite.run("copy", "--from", str(source.path), "--to", offsite_url, "--json", env=env)
    assert sent.returncode == 0, str(sent)
    (stats,) = sent.json()["copied"]
    assert stats["id"] == point["id"] and stats["sent_chunks"] == stats["chunks"]
    again = offsite.run("copy", "--from", str(source.path), "--to", offsite_url, "--json", env=env).json()
    assert again["copied"] == [] and again["already_present"] == 1
    report = offsite.run("verify", "--json", env=offsite_env).json()
    assert [p["state"] for p in report["points"]] == ["verified"]

    # And back from the off-site server into a fresh local repository (a disaster recovery drill).
    home = Repo(tmp_path / "rebuilt", encryption="none")
    home.init()
    back = home.run("copy", "--from", offsite_url, "--json",
                    env=home.env(SUREPOINT_FROM_PASSPHRASE="offsite", **ssh_env))  # fmt: skip
    assert back.returncode == 0, str(back)
    home.restore_matches(point["id"], sha)
    assert home.points()[0]["consistency"] == point["consistency"]


def test_copy_to_s3_and_back(seaweedfs, s3_bucket, tmp_path: Path, source: Repo):
    image = tmp_path / "disk.img"
    sha = make_image(image, 3 * MiB, seed=7)
    point = source.backup(image, name="files")
    s3_env = {**seaweedfs.env(), "SUREPOINT_CACHE_DIR": str(tmp_path / "cache")}
    bucket = Repo(tmp_path / "s3-client", encryption="aes-256-gcm", passphrase="bucket")
    url = f"s3://{s3_bucket}/surepoint"
    bucket_env = bucket.env(SUREPOINT_REPO=url, **s3_env)
    bucket.ok("init", "--encryption", "aes-256-gcm", "--chunk-size", "65536", env=bucket_env)

    env = {**bucket_env, "SUREPOINT_FROM_PASSPHRASE": source.passphrase}
    sent = bucket.run("copy", "--from", str(source.path), "--json", env=env)
    assert sent.returncode == 0, str(sent)
    assert [p["id"] for p in sent.json()["copied"]] == [point["id"]]
    report = bucket.run("verify", "--json", env=bucket_env).json()
    assert [p["state"] for p in report["points"]] == ["verified"]

    home = Repo(tmp_path / "rebuilt", encryption="none")
    home.init()
    back = home.run("copy", "--from", url, "--json", env=home.env(SUREPOINT_FROM_PASSPHRASE="bucket", **s3_env))
    assert back.returncode == 0, str(back)
    home.restore_matches(point["id"], sha)


def test_shipped_logs_follow_their_restore_points(tmp_path: Path, source: Repo):
    from surepoint import storage
    from surepoint.repo.logstore import LogStore
    from surepoint.repo.repository import Repository

    image = tmp_path / "disk.img"
    make_image(image, MiB, seed=8)
    point = source.backup(image, name="pg")
    src = Repository.open(storage.open(str(source.path)), lambda: source.passphrase)
    logs = {f"00000001000000000000000{i}": bytes([i]) * (100_000 + i) for i in range(1, 4)}
    for i, (file, data) in enumerate(logs.items()):
        covers = "2000-01-01T00:00:00.000000Z" if i == 0 else "2999-01-01T00:00:00.000000Z"
        LogStore(src).put("pg", "postgresql", file, data, covers)  # the first one ends before any point
    src.backend.close()
    target = Repo(tmp_path / "dst", encryption="aes-256-gcm", passphrase="other")
    target.init()

    result = copy_ok(target, source)
    assert [p["id"] for p in result["copied"]] == [point["id"]]
    assert result["logs"] == [f"pg/postgresql/{f}" for f in list(logs)[1:]]
    target.ok("gc", "--grace", "0")  # the target keeps the chunks its log records list
    dst = Repository.open(storage.open(str(target.path)), lambda: "other")
    store = LogStore(dst)
    copied = store.list("pg", "postgresql")
    assert [r.file for r in copied] == list(logs)[1:]
    assert all(store.read(r) == logs[r.file] for r in copied)
    dst.backend.close()
    assert copy_ok(target, source)["logs"] == []  # nothing twice


def test_copy_to_s3_cut_off_mid_way_resumes(seaweedfs, s3_bucket, tmp_path: Path, source: Repo):
    import subprocess

    from tests.faultlib import SUREPOINT
    from tests.servers.flaky_proxy import FlakyProxy

    image = tmp_path / "disk.img"
    sha = make_random_image(image, 3 * MiB, seed=9)  # 48 distinct chunks
    point = source.backup(image, name="vm")
    s3_env = {**seaweedfs.env(), "SUREPOINT_CACHE_DIR": str(tmp_path / "cache"), "SUREPOINT_S3_RETRY_SECONDS": "2"}
    bucket = Repo(tmp_path / "s3-client", encryption="none")
    bucket_env = bucket.env(SUREPOINT_REPO=f"s3://{s3_bucket}/copy", **s3_env)
    bucket.ok("init", "--encryption", "none", "--chunk-size", "65536", env=bucket_env)
    # The proxy counts PUTs under chunks/ (a chunk the target may already have is looked up with a
    # HEAD, never a PUT): after 12 uploads, the 13th waits.
    with FlakyProxy(seaweedfs.endpoint, hold_after_puts=12) as proxy:
        env = {**bucket_env, "SUREPOINT_S3_ENDPOINT": proxy.endpoint, "SUREPOINT_FROM_PASSPHRASE": source.passphrase}
        copy_proc = subprocess.Popen(
            [SUREPOINT, "copy", "--from", str(source.path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proxy.holding.wait(120), "the copy never got that far"
            proxy.error_rate = 1.0  # the endpoint answers nothing but 503 from now on
            proxy.release()
            _out, err = copy_proc.communicate(timeout=120)
        finally:
            if copy_proc.poll() is None:
                copy_proc.kill()
    assert copy_proc.returncode == 1 and b"Traceback" not in err, err
    assert bucket.run("list", "--json", env=bucket_env).json()["restore_points"] == []

    resumed = bucket.run("copy", "--from", str(source.path), "--json",
                         env={**bucket_env, "SUREPOINT_FROM_PASSPHRASE": source.passphrase})  # fmt: skip
    assert resumed.returncode == 0, str(resumed)
    (stats,) = resumed.json()["copied"]
    assert 12 <= stats["present_chunks"] < 48 and stats["sent_chunks"] == 48 - stats["present_chunks"]
    bucket.ok("restore", point["id"], "--to", str(tmp_path / "restored.img"), env=bucket_env)
    assert sha256_file(tmp_path / "restored.img") == sha
