"""The SeaweedFS fixture itself: credentials are enforced, Object Lock works, a restart keeps the data."""

import botocore.exceptions
import pytest

from tests.servers.seaweedfs import SeaweedFS


def test_session_server_enforces_credentials(seaweedfs, s3_bucket):
    seaweedfs.client().put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        seaweedfs.client(secret_key="wrong").get_object(Bucket=s3_bucket, Key="k")
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_lock_bucket_refuses_to_delete_a_locked_version(seaweedfs, s3_lock_bucket):
    import datetime

    client = seaweedfs.client()
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    version = client.put_object(
        Bucket=s3_lock_bucket, Key="k", Body=b"v", ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until
    )["VersionId"]
    with pytest.raises(botocore.exceptions.ClientError):
        client.delete_object(Bucket=s3_lock_bucket, Key="k", VersionId=version)
    assert client.get_object(Bucket=s3_lock_bucket, Key="k", VersionId=version)["Body"].read() == b"v"


def test_private_server_restarts_with_its_data_and_stops_cleanly(tmp_path):
    server = SeaweedFS(tmp_path / "weed")
    with server:
        bucket = server.new_bucket()
        server.client().put_object(Bucket=bucket, Key="k", Body=b"kept")
        port = server.port
        process = server.process
        server.stop(kill=True)
        assert process.poll() is not None
        server.start()
        assert server.port == port
        assert server.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"kept"
        process = server.process
    assert process.poll() is not None
