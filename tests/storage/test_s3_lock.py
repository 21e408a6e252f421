"""Object Lock immutability on a real SeaweedFS: originals survive deletes and overwrites, reuse extends retention."""

from __future__ import annotations

import datetime

import pytest

from surepoint.storage.backend import ObjectNotFound
from surepoint.storage.s3 import S3Backend
from surepoint.storage.s3_lock import ObjectLocked, ObjectLockUnavailable, slack_days

DAY = 86400


@pytest.fixture
def s3_env(seaweedfs, monkeypatch, tmp_path):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUREPOINT_CACHE_DIR", str(tmp_path / "cache"))
    return seaweedfs


@pytest.fixture
def immutable(s3_env, s3_lock_bucket):
    backend = S3Backend.open(f"s3://{s3_lock_bucket}/repo", create=True)
    backend.make_immutable(3)
    return backend


def retention(client, bucket, key, version):
    head = client.head_object(Bucket=bucket, Key=key, VersionId=version)
    return head["ObjectLockMode"], head["ObjectLockRetainUntilDate"].timestamp()


def test_a_bucket_without_object_lock_is_refused(s3_env, s3_bucket):
    backend = S3Backend.open(f"s3://{s3_bucket}/repo", create=True)
    with pytest.raises(ObjectLockUnavailable, match="has no Object Lock"):
        backend.make_immutable(7)
    assert ObjectLockUnavailable.exit_code == 2


def test_every_repository_object_is_locked_in_compliance_mode(immutable, s3_env):
    now = datetime.datetime.now(datetime.UTC).timestamp()
    immutable.put("config", b'{"id": "00"}')
    immutable.put("chunks/ab/ab01", b"chunk", durable=False)
    immutable.put("indexes/p.0", b"index")
    immutable.put("restorepoints/p", b"manifest")
    immutable.put("locks/l1", b"lock")
    immutable.sync()
    client = s3_env.client()
    for name in ("config", "chunks/ab/ab01", "indexes/p.0", "restorepoints/p", "s3-object-lock.json"):
        key = "repo/" + name
        version = client.list_object_versions(Bucket=immutable.bucket, Prefix=key)["Versions"][0]["VersionId"]
        mode, until = retention(client, immutable.bucket, key, version)
        assert mode == "COMPLIANCE"
        assert until >= now + (3 + slack_days(3)) * DAY - 120
    head = client.head_object(Bucket=immutable.bucket, Key="repo/locks/l1")
    assert "ObjectLockMode" not in head  # locks come and go
    immutable.delete("locks/l1")
    assert not immutable.exists("locks/l1")
    assert not client.list_object_versions(Bucket=immutable.bucket, Prefix="repo/locks/").get("Versions")


def test_originals_survive_delete_markers_and_overwrites(immutable, s3_env):
    immutable.put("chunks/ab/ab01", b"original")
    immutable.put("restorepoints/p", b"manifest")
    client = s3_env.client()
    bucket = immutable.bucket
    for key in ("repo/chunks/ab/ab01", "repo/restorepoints/p"):
        client.delete_object(Bucket=bucket, Key=key)  # a delete marker
        client.put_object(Bucket=bucket, Key=key, Body=b"ransom")  # a new current version
        client.delete_object(Bucket=bucket, Key=key)
        for version in client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]:
            if version["IsLatest"] is False and version["Size"] == len(b"ransom"):
                client.delete_object(Bucket=bucket, Key=key, VersionId=version["VersionId"])
    fresh = S3Backend.open(immutable.location)
    assert fresh.object_lock is not None and fresh.object_lock.days == 3
    assert fresh.get("chunks/ab/ab01") == b"original"
    assert fresh.exists("restorepoints/p")
    assert [i.name for i in fresh.list("restorepoints/")] == ["restorepoints/p"]
    assert fresh.get("restorepoints/p") == b"manifest"


def test_the_config_of_an_immutable_repository_cannot_change(immutable):
    immutable.put("config", b'{"id": "00"}')
    with pytest.raises(Exception, match="cannot change"):
        immutable.put("config", b'{"id": "11"}')


def test_deleting_a_locked_object_says_until_when(immutable):
    immutable.put("chunks/ab/ab01", b"data")
    with pytest.raises(ObjectLocked) as caught:
        immutable.delete("chunks/ab/ab01")
    assert caught.value.until > datetime.datetime.now(datetime.UTC).timestamp() + 3 * DAY
    assert "locked until" in str(caught.value)
    assert immutable.get("chunks/ab/ab01") == b"data"
    with pytest.raises(ObjectNotFound):
        immutable.delete("chunks/ab/none")


def test_reuse_extends_a_retention_that_ends_too_soon(immutable, s3_env):
    client = s3_env.client()
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    version = client.put_object(
        Bucket=immutable.bucket,
        Key="repo/chunks/cd/cd01",
        Body=b"old chunk",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=soon,
    )["VersionId"]
    backend = S3Backend.open(immutable.location)
    assert backend.touch("chunks/cd/cd01")
    _mode, until = retention(client, immutable.bucket, "repo/chunks/cd/cd01", version)
    assert until >= datetime.datetime.now(datetime.UTC).timestamp() + 3 * DAY
    assert not backend.touch("chunks/cd/missing")
