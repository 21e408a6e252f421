"""Failback without a guest: what the replica wrote after failover, plus where the original moved
away from the failover point, goes back into the original disks, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from surepoint.replica.failback import failback
from surepoint.replica.failover import boot_spec, make_overlays
from surepoint.replica.layout import ReplicaDir
from tests.replica.test_failover import MIB, SIZE, expected, make_replica, qemu_io, read_disk, replica_files


def fail_over_by_hand(replica: ReplicaDir, point: str) -> dict[str, str]:
    """What `failover` leaves in the record, minus the VM (it is off, as after its shutdown)."""
    spec = boot_spec(replica, point)
    overlays = make_overlays(spec, os.path.join(replica.path, "failover"))
    with replica:
        replica.state = "failed-over"
        replica.failover = {
            "point": point,
            "name": "web-replica",
            "overlays": {d["device"]: o for d, o in zip(spec.disks, overlays, strict=True)},
            "pid": None,
            "pid_start": None,
        }
        replica.save()
    return dict(replica.failover["overlays"])


def bitmaps(path: str) -> list[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True).stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def test_failback_sends_the_replica_changes_and_the_divergence_only(tmp_path: Path):
    replica, originals = make_replica(tmp_path, points=2)
    # the original ran on after the point (MiB 5 of root), and backups and replication track its writes
    qemu_io(originals["root"], f"write -P 77 {5 * MIB} {MIB}")
    subprocess.run(["qemu-img", "bitmap", "--add", originals["root"], "surepoint-backup"], check=True)
    overlays = fail_over_by_hand(replica, "p2")
    qemu_io(overlays["root"], f"write -P 200 0 {2 * MIB}")  # the replica VM writes 2 MiB + 1 MiB
    qemu_io(overlays["data"], f"write -P 201 {6 * MIB} {MIB}")
    wanted = {device: read_disk(path) for device, path in overlays.items()}
    before = replica_files(replica)

    report = failback(replica, start=False)

    for device, path in originals.items():
        assert read_disk(path) == wanted[device], device
    root, data = report["disks"]
    assert (root["replica_changed_bytes"], root["diverged_bytes"], root["sent_bytes"]) == (2 * MIB, MIB, 3 * MIB)
    assert (data["replica_changed_bytes"], data["diverged_bytes"], data["sent_bytes"]) == (MIB, 0, MIB)
    assert report["sent_bytes"] == 4 * MIB and report["disk_bytes"] == 2 * SIZE
    assert root["bitmaps_removed"] == ["surepoint-backup"] and bitmaps(originals["root"]) == []
    assert replica_files(replica) == before  # the replica's chain is as replication left it
    again = ReplicaDir.open(replica.path)
    assert again.state == "ready" and again.failover is None
    assert again.extra["failback"]["sent_bytes"] == 4 * MIB
    assert not [n for n in os.listdir(os.path.join(replica.path, "failover")) if n.endswith(".qcow2")]
    assert read_disk(again.chain_files("latest", "root")) == expected(2)


def test_failback_to_a_new_location_copies_the_whole_state(tmp_path: Path):
    replica, originals = make_replica(tmp_path, points=2)
    overlays = fail_over_by_hand(replica, "p1")
    qemu_io(overlays["root"], f"write -P 9 {7 * MIB} {MIB}")
    wanted = read_disk(overlays["root"])
    untouched = read_disk(originals["root"])
    report = failback(replica, to=str(tmp_path / "new"), start=False)
    assert read_disk(str(tmp_path / "new" / "root.qcow2")) == wanted
    assert read_disk(originals["root"]) == untouched
    assert report["disks"][0]["sent_bytes"] == 2 * MIB  # point 1's MiB and the replica's
    assert os.stat(tmp_path / "new" / "root.qcow2").st_mode & 0o777 == 0o600
