"""An immutable S3 repository (Object Lock) against an attacker holding the repository's own credentials."""

from __future__ import annotations

import botocore.exceptions
import pytest

from tests.conftest import Cli, change_image, make_image, sha256_file

SMALL_CHUNKS = "262144"


def s3_cli(tmp_path, server, bucket: str) -> Cli:
    cli = Cli(tmp_path)
    cli.repo = f"s3://{bucket}/repo"
    cli.env.update(server.env(), SUREPOINT_REPO=cli.repo, SUREPOINT_CACHE_DIR=str(tmp_path / "cache"))
    return cli


def refused(call, **arguments) -> bool:
    try:
        call(**arguments)
    except botocore.exceptions.ClientError:
        return True
    return False


def attack(client, bucket: str, prefix: str) -> dict[str, int]:
    """Delete, overwrite, shorten the retention of and delete by version every object under `prefix`."""
    counts = {"versions": 0, "delete refused": 0, "shorten refused": 0, "governance refused": 0}
    originals = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        originals += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    keys = sorted({key for key, _ in originals})
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)  # accepted: only adds a delete marker
        client.put_object(Bucket=bucket, Key=key, Body=b"ransom note")  # accepted: only adds a version
    past = "2000-01-01"
    for key, version in originals:
        target = {"Bucket": bucket, "Key": key, "VersionId": version}
        counts["versions"] += 1
        counts["delete refused"] += refused(client.delete_object, **target)
        counts["shorten refused"] += refused(
            client.put_object_retention, **target, Retention={"Mode": "COMPLIANCE", "RetainUntilDate": past}
        )
        counts["governance refused"] += refused(
            client.put_object_retention,
            **target,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past},
            BypassGovernanceRetention=True,
        )
    batch = [{"Key": key, "VersionId": version} for key, version in originals[:1000]]
    errors = client.delete_objects(Bucket=bucket, Delete={"Objects": batch}).get("Errors", [])
    counts["batch delete refused"] = len(errors)
    return counts


@pytest.mark.slow
def test_immutable_repository_survives_its_own_credentials(tmp_path, seaweedfs, s3_lock_bucket):
    cli = s3_cli(tmp_path, seaweedfs, s3_lock_bucket)
    image = make_image(tmp_path / "disk.img", 16 << 20, seed=11, regions=10)
    cli.run("init", "--immutable-days", "2", "--chunk-size", SMALL_CHUNKS, check=True)
    cli.run("backup", str(image), "--name", "vm1", check=True)
    expected = [sha256_file(image)]
    change_image(image, seed=12)
    cli.run("backup", str(image), "--name", "vm1", check=True)
    expected.append(sha256_file(image))

    counts = attack(seaweedfs.client(), s3_lock_bucket, "repo/")
    kinds = {"config", "s3-object-lock.json", "chunks", "indexes", "restorepoints"}
    assert counts["versions"] >= 10
    for what in ("delete refused", "shorten refused", "governance refused", "batch delete refused"):
        assert counts[what] == counts["versions"], (what, counts)
    listed = seaweedfs.client().list_object_versions(Bucket=s3_lock_bucket, Prefix="repo/")
    assert kinds <= {v["Key"].split("/")[1] for v in listed["Versions"]}

    forget = cli.run("forget", "--keep-last", "1", "--json", check=True).json()
    locked = [d for d in forget["decisions"] if not d["keep"]]
    assert len(locked) == 1 and "locked_until" in locked[0]
    cli.run("gc", "--grace", "0", check=True)

    points = cli.points()
    assert len(points) == 2
    for point, sha in zip(points, expected, strict=True):
        out = tmp_path / f"{point['id']}.img"
        cli.run("restore", point["id"], "--to", str(out), check=True)
        assert sha256_file(out) == sha
    assert "0 damaged" in cli.run("verify", check=True).stdout

    # Forever-incremental goes on after the attack.
    change_image(image, seed=13)
    third = cli.run("backup", str(image), "--name", "vm1", "--json", check=True).json()
    assert third["disks"][0]["reused_chunks"] > 0
    cli.run("restore", "vm1:latest", "--to", str(tmp_path / "third.img"), check=True)
    assert sha256_file(tmp_path / "third.img") == sha256_file(image)


def test_immutable_days_needs_a_bucket_with_object_lock(tmp_path, seaweedfs, s3_bucket):
    cli = s3_cli(tmp_path, seaweedfs, s3_bucket)
    result = cli.run("init", "--immutable-days", "7")
    assert result.returncode == 2
    assert "has no Object Lock" in result.stderr and result.stderr.strip().count("\n") == 0
    local = Cli(tmp_path / "local")
    result = local.run("init", "--immutable-days", "7")
    assert result.returncode == 2 and "Object Lock" in result.stderr
