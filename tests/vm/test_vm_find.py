"""Guest paths and the file index on the test guest: /data is its second disk (LABEL= in its fstab),
so `restore-files NAME:latest /data/...` and `find` work with the paths the guest uses."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from tests.conftest import Cli

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: FUSE and loop mounts"),
    pytest.mark.usefixtures("no_surepoint_bitmaps"),
]


def test_guest_paths_and_find_on_the_test_guest(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.env["SUREPOINT_MOUNT_STATE_DIR"] = str(tmp_path / "mount-state")
    cli.run("init", check=True)
    name = f"find-{secrets.token_hex(3)}"
    first_text, second_text = f"version 1 {name}\n".encode(), f"version 2 {name}\n".encode()
    test_vm.run(["sh", "-c", "mountpoint -q /data || mount /data"])
    with test_vm.agent() as ga:
        ga.write_file(f"/data/{name}.conf", first_text)
    test_vm.run(["sync"])

    started = time.monotonic()
    first = cli.run("vm", "backup", test_vm.name, "--index", "--json", timeout=600)
    assert first.returncode == 0, first.stderr
    first_seconds = time.monotonic() - started
    p1 = first.json()["vms"][0]["restore_point"]

    with test_vm.agent() as ga:
        ga.write_file(f"/data/{name}.conf", second_text)
    test_vm.run(["sync"])
    started = time.monotonic()
    second = cli.run("vm", "backup", test_vm.name, "--index", "--json", timeout=600)
    assert second.returncode == 0, second.stderr
    second_seconds = time.monotonic() - started
    p2 = second.json()["vms"][0]["restore_point"]
    print(f"\nbackup + file index of the test guest: {first_seconds:.1f} s full, {second_seconds:.1f} s incremental")

    found = cli.run("find", f"{name}.conf", "--json", check=True).json()
    [entry] = found["paths"]
    assert entry["path"] == f"/data/{name}.conf"  # as the guest sees it, not disk1/fs/...
    assert [(v["restore_point"], v["change"]) for v in entry["versions"]] == [(p1, "present"), (p2, "changed")]
    assert [v["size"] for v in entry["versions"]] == [len(first_text), len(second_text)]
    assert cli.run("find", "/etc/fstab", "--json", check=True).json()["paths"][0]["path"] == "/etc/fstab"

    out = tmp_path / "out"
    restored = cli.run(
        "restore-files", f"{test_vm.name}:latest", f"/data/{name}.conf", "/etc/hostname", "--to", str(out)
    )
    assert restored.returncode == 0, restored.stderr
    assert (out / "data" / f"{name}.conf").read_bytes() == second_text
    assert (out / "etc" / "hostname").read_text().strip() == "surepoint-test"
    older = cli.run("restore-files", p1, f"/data/{name}.conf", "--to", str(tmp_path / "older"), check=True)
    assert "/data on disk 1 fs" in older.stdout
    assert (tmp_path / "older" / "data" / f"{name}.conf").read_bytes() == first_text
    test_vm.run(["rm", "-f", f"/data/{name}.conf"])
