"""The S3 backend against a real SeaweedFS: object semantics, parallel uploads, errors, metadata cache."""

from __future__ import annotations

import os
import stat

import pytest

from surepoint.errors import RepositoryNotFound, SurepointError
from surepoint.storage.backend import ObjectNotFound
from surepoint.storage.s3 import S3Backend, S3CredentialsRefused, S3Location, S3Unreachable
from tests.servers.seaweedfs import free_ports
from tests.storage.suite import BackendSuite


@pytest.fixture
def s3_env(seaweedfs, monkeypatch, tmp_path):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUREPOINT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SUREPOINT_S3_RETRY_SECONDS", "2")
    return seaweedfs


@pytest.fixture
def backend(s3_env, s3_bucket):
    b = S3Backend.open(f"s3://{s3_bucket}/repo", create=True)
    yield b
    b.close()


def count_requests(backend: S3Backend, operation: str) -> list[int]:
    calls = [0]
    backend.client.meta.events.register(f"before-call.s3.{operation}", lambda **_kw: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_location_parsing():
    assert S3Location.parse("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert S3Location.parse("s3://bucket").key("config") == "config"
    assert S3Location.parse("s3://bucket/p").key("chunks/ab/cd") == "p/chunks/ab/cd"
    for bad in ("s3://", "s3://b/x", "s3://bucket/a//b", "s3://bucket/../x"):
        with pytest.raises(SurepointError):
            S3Location.parse(bad)


def test_objects_put_get_list_delete(backend):
    backend.put("config", b"{}")
    backend.put("chunks/ab/ab01", b"x" * 1000)
    backend.put("chunks/cd/cd02", b"y")
    assert backend.get("chunks/ab/ab01") == b"x" * 1000
    assert backend.exists("chunks/cd/cd02") and not backend.exists("chunks/cd/nope")
    assert sorted(i.name for i in backend.list("chunks/")) == ["chunks/ab/ab01", "chunks/cd/cd02"]
    assert backend.stat("chunks/ab/ab01").size == 1000
    backend.delete("chunks/cd/cd02")
    with pytest.raises(ObjectNotFound):
        backend.get("chunks/cd/cd02")
    with pytest.raises(ObjectNotFound):
        backend.delete("chunks/cd/cd02")
    with pytest.raises(ObjectNotFound):
        backend.stat("missing")


def test_touch_is_a_lookup_and_rename_moves(backend):
    backend.put("chunks/ab/ab01", b"data")
    copies = count_requests(backend, "CopyObject")
    assert backend.touch("chunks/ab/ab01")
    assert not backend.touch("chunks/ab/missing")
    assert copies[0] == 0  # no copy per reused chunk
    backend.rename("chunks/ab/ab01", "trash/ab01")
    assert not backend.exists("chunks/ab/ab01") and backend.get("trash/ab01") == b"data"
    with pytest.raises(ObjectNotFound):
        backend.rename("chunks/ab/ab01", "trash/again")


def test_parallel_uploads_are_all_there_after_sync(backend):
    puts = count_requests(backend, "PutObject")
    blobs = {f"chunks/{i:02x}/{i:064x}": os.urandom(4096) for i in range(64)}
    for name, data in blobs.items():
        backend.put(name, data, durable=False)
    backend.sync()
    assert puts[0] == 64
    assert {i.name for i in backend.list("chunks/")} == set(blobs)
    for name, data in blobs.items():
        assert backend.get(name) == data


def test_a_read_after_an_unsynced_put_sees_the_object(backend):
    backend.put("indexes/x.0", b"index", durable=False)
    assert backend.exists("indexes/x.0")
    assert backend.get("indexes/x.0") == b"index"


def test_new_repository_needs_an_empty_prefix(s3_env, s3_bucket):
    S3Backend.open(f"s3://{s3_bucket}/used", create=True).put("config", b"{}")
    with pytest.raises(SurepointError, match="not empty"):
        S3Backend.open(f"s3://{s3_bucket}/used", create=True)
    S3Backend.open(f"s3://{s3_bucket}/other", create=True)


def test_wrong_credentials_missing_bucket_and_dead_endpoint_are_one_line_errors(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(S3CredentialsRefused, match="refused the credentials") as caught:
        S3Backend.open(f"s3://{s3_bucket}/repo")
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with pytest.raises(RepositoryNotFound, match="does not exist"):
        S3Backend.open("s3://no-such-bucket-here/repo")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(S3CredentialsRefused, match="no S3 credentials"):
        S3Backend.open(f"s3://{s3_bucket}/repo")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    (port,) = free_ports(1)
    monkeypatch.setenv("SUREPOINT_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SUREPOINT_S3_RETRY_SECONDS", "1")
    with pytest.raises(S3Unreachable, match=f"127.0.0.1:{port} is unreachable"):
        S3Backend.open(f"s3://{s3_bucket}/repo")


def test_manifests_and_indexes_are_read_once_then_from_the_private_cache(backend, tmp_path):
    backend.put("config", b'{"id": "0123abcd"}')
    backend.put("restorepoints/p1", b"manifest")
    backend.put("chunks/ab/ab01", b"chunk")
    reader = S3Backend.open(backend.location)
    gets = count_requests(reader, "GetObject")
    reader.get("config")
    for _ in range(3):
        assert reader.get("restorepoints/p1") == b"manifest"
        assert reader.get("chunks/ab/ab01") == b"chunk"
    assert gets[0] == 1 + 1 + 3  # config, the manifest once, the chunk every time
    directory = tmp_path / "cache" / "0123abcd"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert len(list(directory.iterdir())) == 1
    reader.delete("restorepoints/p1")
    assert list(directory.iterdir()) == []
    with pytest.raises(ObjectNotFound):
        reader.get("restorepoints/p1")


class TestS3Backend(BackendSuite):
    """The storage contract's conformance suite, on SeaweedFS."""

    @pytest.fixture
    def backend(self, s3_env, s3_bucket):
        b = S3Backend.open(f"s3://{s3_bucket}/repo", create=True)
        yield b
        b.close()
