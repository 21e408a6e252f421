"""`surepoint lab verify replica:DIR@POINT`: a replica state goes through the lab like a restore point
(here one whose QEMU refuses to start: the lab reports it, tears everything down, touches nothing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.replica.test_failover import make_replica, replica_files

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (a network namespace)")


def test_a_replica_state_in_the_lab(tmp_path: Path):
    replica, _ = make_replica(tmp_path)
    with replica:
        replica.source.argv.insert(1, "-no-such-option")
        replica.save()
    before = replica_files(replica)
    cli = Cli(tmp_path)
    cli.run("init", check=True)
    env = {"SUREPOINT_LAB_DIR": str(tmp_path / "labs")}
    reports = tmp_path / "reports"
    r = cli.run(
        "lab", "verify", f"replica:{replica.path}@p1", "--no-integrity", "--report-dir", str(reports), "--json", env=env
    )
    assert r.returncode == 4, r.stdout + r.stderr
    report = r.json()
    (vm,) = report["vms"]
    assert vm["restore_point"] == f"replica:{replica.path}@p1" and vm["name"] == "web"
    assert vm["outcome"] == "failed" and "QEMU exited" in vm["reason"] and "no-such-option" in vm["reason"]
    assert report["cleanup"] == [] and not os.listdir(tmp_path / "labs")
    assert replica_files(replica) == before
    assert json.loads(Path(replica.path, "replica.json").read_text())["state"] == "ready"
    r = cli.run("lab", "verify", f"replica:{tmp_path}/nothing@p1", "--no-integrity", env=env)
    assert r.returncode == 1 and "no replica at" in r.stderr, r.stderr
