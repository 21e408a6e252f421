"""Bad input to the replication commands: one clear line and an exit code, never a traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import Cli


def test_missing_vm(tmp_path: Path) -> None:
    result = Cli(tmp_path).run("replicate", "vm", "no-such-vm", "--to", str(tmp_path / "site"), "--json")
    assert result.returncode == 1
    (vm,) = result.json()["vms"]
    assert vm["status"] == "failed" and "no-such-vm" in vm["error"]
    assert not (tmp_path / "site" / "no-such-vm-replica").exists()


def test_unreachable_target(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    env = {"SUREPOINT_SSH_COMMAND": "ssh -F /dev/null -o ConnectTimeout=5 -o StrictHostKeyChecking=no"}
    result = cli.run("replica", "list", "ssh://root@127.0.0.1:1/srv/replicas", env=env)
    assert result.returncode == 1
    assert "cannot reach the replica's host at ssh://root@127.0.0.1:1/srv/replicas" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_target_and_names(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    result = cli.run("replicate", "vm", "a", "--to", "s3://bucket/x")
    assert result.returncode == 2 and "replication target" in result.stderr
    result = cli.run("replicate", "vm", "a", "b", "--to", str(tmp_path), "--replica-name", "x")
    assert result.returncode == 2
    result = cli.run("replica", "list", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "no replicas" in result.stderr
    result = cli.run("replica", "remove", str(tmp_path / "x-replica"))
    assert result.returncode == 2 and "--yes" in result.stderr


def test_list_forget_remove(tmp_path: Path) -> None:
    """A replica made by hand with qemu-img (two points), then listed, a point forgotten, removed."""
    from surepoint.replica import images
    from surepoint.replica.layout import ReplicaDir, ReplicaPoint, SourceConfig, SourceDisk

    replica = ReplicaDir.create(str(tmp_path / "web-replica"), "web", SourceConfig(disks=[SourceDisk("vda", 1 << 20)]))
    with replica:
        images.create(str(tmp_path / "web-replica/disks/vda.base.qcow2"), 1 << 20)
        replica.add_point(ReplicaPoint("p1", "2026-11-30T10:00:00.000000Z", "crash", {"vda": "disks/vda.base.qcow2"}))
        images.create(str(tmp_path / "web-replica/disks/vda.p2.qcow2"), 1 << 20, backing="vda.base.qcow2")
        subprocess.run(
            ["qemu-io", "-c", "write -P 7 0 65536", str(tmp_path / "web-replica/disks/vda.p2.qcow2")],
            check=True,
            capture_output=True,
        )
        replica.add_point(
            ReplicaPoint("p2", "2026-11-30T10:05:00.000000Z", "filesystem", {"vda": "disks/vda.p2.qcow2"})
        )
    cli = Cli(tmp_path)
    listed = cli.run("replica", "list", str(tmp_path), "--json", check=True).json()["replicas"]
    assert [(p["id"], p["consistency"], p["bytes"]) for p in listed[0]["points"]] == [
        ("p1", "crash", 0),
        ("p2", "filesystem", 65536),
    ]
    table = cli.run("replica", "list", str(tmp_path / "web-replica"), check=True).stdout
    assert "p2" in table and "filesystem" in table
    cli.run("replica", "forget", str(tmp_path / "web-replica"), "p1", check=True)
    points = json.loads((tmp_path / "web-replica/replica.json").read_text())["points"]
    assert [(p["id"], p["files"]["vda"]) for p in points] == [("p2", "disks/vda.base.qcow2")]
    cli.run("replica", "remove", str(tmp_path / "web-replica"), "--yes", check=True)
    assert not (tmp_path / "web-replica").exists()
