"""S3 endpoint faults through the real command: killed mid-backup, flaky (503s and delays)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import SUREPOINT, Cli, change_image, make_image, sha256_file
from tests.servers.flaky_proxy import FlakyProxy
from tests.servers.seaweedfs import SeaweedFS

SMALL_CHUNKS = "262144"


def s3_cli(tmp_path, server: SeaweedFS, bucket: str, endpoint: str | None = None) -> Cli:
    cli = Cli(tmp_path)
    cli.repo = f"s3://{bucket}/repo"
    cli.env.update(server.env(endpoint), SUREPOINT_REPO=cli.repo, SUREPOINT_CACHE_DIR=str(tmp_path / "cache"))
    cli.env["SUREPOINT_S3_RETRY_SECONDS"] = "3"
    return cli


@pytest.mark.slow
def test_endpoint_killed_mid_backup_leaves_no_restore_point_and_the_next_run_completes(tmp_path):
    image = make_image(tmp_path / "disk.img", 32 << 20, seed=5, regions=24)
    with SeaweedFS(tmp_path / "weed") as server, FlakyProxy(server.endpoint, hold_after_puts=10) as proxy:
        bucket = server.new_bucket()
        cli = s3_cli(tmp_path, server, bucket, proxy.endpoint)
        cli.run("init", "--encryption", "none", "--chunk-size", SMALL_CHUNKS, check=True)
        backup = subprocess.Popen(
            [SUREPOINT, "backup", str(image), "--name", "vm1"],
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proxy.holding.wait(120), "the backup never got to its eleventh chunk"
            server.stop(kill=True)
            proxy.release()
            _out, err = backup.communicate(timeout=120)
        finally:
            if backup.poll() is None:
                backup.kill()
        assert backup.returncode == 1, err
        assert "Traceback" not in err
        assert f"{proxy.endpoint.removeprefix('http://')} is unreachable" in err.strip().splitlines()[-1]

        server.start()
        direct = s3_cli(tmp_path, server, bucket)
        assert direct.points() == []
        direct.run("backup", str(image), "--name", "vm1", check=True)
        direct.run("restore", "vm1:latest", "--to", str(tmp_path / "out.img"), check=True)
        assert sha256_file(tmp_path / "out.img") == sha256_file(image)


def test_endpoint_down_at_start_is_one_clear_line(tmp_path, seaweedfs, s3_bucket):
    from tests.servers.seaweedfs import free_ports

    (port,) = free_ports(1)
    cli = s3_cli(tmp_path, seaweedfs, s3_bucket, f"http://127.0.0.1:{port}")
    cli.env["SUREPOINT_S3_RETRY_SECONDS"] = "1"
    result = cli.run("list")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert f"127.0.0.1:{port} is unreachable" in result.stderr


def test_wrong_credentials_and_missing_bucket_through_the_command(tmp_path, seaweedfs, s3_bucket):
    cli = s3_cli(tmp_path, seaweedfs, s3_bucket)
    result = cli.run("list", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert result.returncode == 1
    assert "refused the credentials" in result.stderr and result.stderr.strip().count("\n") == 0
    result = cli.run("init", env={"SUREPOINT_REPO": "s3://no-such-bucket-anywhere/repo"})
    assert result.returncode == 1
    assert "bucket 'no-such-bucket-anywhere' does not exist" in result.stderr


def test_a_flaky_endpoint_still_gets_full_incremental_and_restore_done(tmp_path, seaweedfs, s3_bucket):
    image = make_image(tmp_path / "disk.img", 24 << 20, seed=7, regions=12)
    with FlakyProxy(seaweedfs.endpoint, error_rate=0.15, error_after_rate=0.1, delay_rate=0.1, seed=3) as proxy:
        cli = s3_cli(tmp_path, seaweedfs, s3_bucket, proxy.endpoint)
        cli.env["SUREPOINT_S3_RETRY_SECONDS"] = "30"
        cli.run("init", "--encryption", "aes-256-gcm", "--chunk-size", SMALL_CHUNKS, check=True)
        cli.run("backup", str(image), "--name", "vm1", check=True)
        change_image(image, seed=8)
        cli.run("backup", str(image), "--name", "vm1", check=True)
        cli.run("restore", "vm1:latest", "--to", str(tmp_path / "out.img"), check=True)
        assert sha256_file(tmp_path / "out.img") == sha256_file(image)
    assert proxy.counts["503 before"] > 5 and proxy.counts["503 after"] > 5 and proxy.counts["delayed"] > 5
