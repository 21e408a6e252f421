"""`surepoint replicate vm` on the running test VM, through the real CLI: while the guest appends
numbered, checksummed records, every replica point holds a clean prefix of them up to its freeze;
incremental cycles send about what changed; backups and replication alternate and both stay
incremental; cycles over ssh:// to 127.0.0.1; a cycle killed with -9 leaves the last point intact.

One replica (module fixture) is built by a first, full cycle and shared by the tests, which run in
file order. The CLI opens its own QMP and guest-agent connections: the tests hold none meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SUREPOINT, Cli
from tests.remote.sshd import sshd  # noqa: F401 - the session fixture
from tests.vm.test_vm_backup import RECORD_WRITER, check_records, count_lines

pytestmark = [pytest.mark.kvm]

MiB = 1 << 20
RECORDS = "/data/replica-records.log"


def replicate(cli: Cli, test_vm, target: str, *args: str, env: dict | None = None) -> dict:
    result = cli.run("replicate", "vm", test_vm.name, "--to", target, "--json", *args, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (vm,) = result.json()["vms"]
    assert vm["status"] == "ok", vm
    return vm


def replica_dir(target: Path, test_vm) -> Path:
    return target / f"{test_vm.name}-replica"


def record(replica: Path) -> dict:
    return json.loads((replica / "replica.json").read_text())


def records_in(replica: Path, point: dict, workdir: Path) -> int:
    """How many records the data disk holds at a point (checked whole, in order, checksums right)."""
    raw = workdir / "data.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(replica / point["files"]["data"]), str(raw)],
        check=True,
    )
    try:
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        cat = subprocess.run(["debugfs", "-R", f"cat {RECORDS.removeprefix('/data')}", str(raw)], capture_output=True)
        return check_records(cat.stdout)
    finally:
        raw.unlink()


def replica_bitmaps(test_vm, replica: Path) -> dict[str, list[str]]:
    """The dirty bitmaps of one replica on the VM's disks, per disk."""
    prefix = "surepoint-r" + record(replica)["id"][:12]
    with test_vm.qmp() as qmp:
        return {
            n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps", []) if b["name"].startswith(prefix))
            for n in qmp.query_named_block_nodes()
            if n["node-name"] in test_vm.disks
        }


def remove_bitmaps(test_vm, prefix: str) -> None:
    with test_vm.qmp() as qmp:
        for node in qmp.query_named_block_nodes():
            for bitmap in node.get("dirty-bitmaps", []):
                if node["node-name"] in test_vm.disks and bitmap.get("name", "").startswith(prefix):
                    qmp.execute("block-dirty-bitmap-remove", node=node["node-name"], name=bitmap["name"])


def view_left(test_vm) -> list:
    with test_vm.qmp() as qmp:
        nodes = [n["node-name"] for n in qmp.query_named_block_nodes() if n["node-name"].startswith("sp-")]
        return nodes + qmp.query_block_jobs() + qmp.execute("query-block-exports")


def fleece_open(test_vm) -> bool:
    """Whether QEMU has a point-in-time view's temporary image open (without taking its QMP socket,
    which the replicating command holds)."""
    fds = f"/proc/{test_vm.proc.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.path.basename(os.readlink(os.path.join(fds, fd))).startswith("fleece-"):
                return True
        except OSError:
            pass
    return False


def processes_using(path: Path) -> list[str]:
    """Command lines of the processes that name `path` in theirs."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(cmdline[:200])
    return found


class Writer:
    """The guest appending records to RECORDS (one write(2) and fsync each)."""

    def __init__(self, test_vm) -> None:
        self.test_vm = test_vm
        deadline = time.monotonic() + 120
        while True:  # the guest agent answers early in the boot: the data disk may not be mounted yet
            with test_vm.agent() as ga:
                if ga.exec(["mountpoint", "-q", "/data"]).ok:
                    break
            assert time.monotonic() < deadline, "/data is not mounted in the guest"
            time.sleep(1.0)
        test_vm.run(["rm", "-f", RECORDS])
        with test_vm.agent() as ga:
            self.pid = ga.exec_start(["perl", "-e", RECORD_WRITER, RECORDS, "900"], capture=True)
        deadline = time.monotonic() + 60
        while self.count() < 20:
            assert time.monotonic() < deadline, "the record writer does not write"
            time.sleep(0.5)

    def count(self) -> int:
        return count_lines(self.test_vm, RECORDS)

    def stop(self) -> None:
        with self.test_vm.agent() as ga:
            ga.exec(["kill", str(self.pid)])


@pytest.fixture(scope="module")
def shared(test_vm, tmp_path_factory) -> Iterator[dict]:
    """The replica target, a CLI runner, the record writer, and the first (full) cycle's figures."""
    tmp = tmp_path_factory.mktemp("replica")
    cli = Cli(tmp)
    target = tmp / "site"
    writer = Writer(test_vm)
    before = writer.count()
    started = time.monotonic()
    first = replicate(cli, test_vm, str(target))
    first_seconds = time.monotonic() - started
    after = writer.count()
    try:
        yield {
            "cli": cli,
            "target": target,
            "writer": writer,
            "first": first,
            "first_window": (before, after),
            "first_seconds": first_seconds,
        }
    finally:
        writer.stop()
        test_vm.run(["rm", "-f", RECORDS])
        remove_bitmaps(test_vm, "surepoint-r")  # this replica's bitmaps go with it


def test_points_hold_clean_prefixes_and_cycles_send_changes(test_vm, shared, tmp_path: Path) -> None:
    cli, target, writer = shared["cli"], shared["target"], shared["writer"]
    first = shared["first"]
    assert first["cbt"] == "full" and first["consistency"] == "filesystem", first
    windows = [shared["first_window"]]
    cycles = []
    for _ in range(2):
        before = writer.count()
        started = time.monotonic()
        cycles.append((replicate(cli, test_vm, str(target)), time.monotonic() - started))
        windows.append((before, writer.count()))
    for vm, seconds in cycles:
        assert vm["cbt"] == "dirty bitmap" and vm["consistency"] == "filesystem", vm
        # the guest appended some KiB of records (and its journal): a cycle sends that, not the disks
        assert vm["sent_bytes"] < 24 * MiB, vm
        print(f"\nincremental cycle: {seconds:.1f} s, sent {vm['sent_bytes'] / MiB:.2f} MiB, notes {vm['notes']}")
    print(
        f"\nfirst cycle: {shared['first_seconds']:.1f} s, sent {first['sent_bytes'] / MiB:.0f} MiB "
        f"(read {first['read_bytes'] / MiB:.0f} MiB)"
    )
    assert first["sent_bytes"] > 20 * max(vm["sent_bytes"] for vm, _ in cycles)

    replica = replica_dir(target, test_vm)
    points = record(replica)["points"]
    assert [p["id"] for p in points] == [first["point"]] + [vm["point"] for vm, _ in cycles]
    for point, (before, after) in zip(points, windows, strict=True):
        found = records_in(replica, point, tmp_path)
        print(f"point {point['id']}: {found} records (guest had {before} before the cycle, {after} after)")
        assert before <= found <= after
    # the replica's overlays hold what each cycle sent; QEMU keeps one bitmap of this replica per disk
    assert all(names == [points[-1]["bitmap"]] for names in replica_bitmaps(test_vm, replica).values())
    assert view_left(test_vm) == []

    (listed,) = cli.run("replica", "list", str(replica), "--json", check=True).json()["replicas"]
    assert [p["id"] for p in listed["points"]] == [p["id"] for p in points]
    assert {p["consistency"] for p in listed["points"]} == {"filesystem"}


def test_backups_and_replication_alternate_both_incremental(test_vm, shared) -> None:
    cli, target = shared["cli"], shared["target"]
    cli.run("init", check=True)
    seen = []
    for _ in range(2):
        backup = cli.run("vm", "backup", test_vm.name, "--json", timeout=600)
        assert backup.returncode == 0, backup.stderr
        seen.append(("backup", backup.json()["vms"][0]["cbt"]))
        seen.append(("replication", replicate(cli, test_vm, str(target))["cbt"]))
    assert seen == [
        ("backup", "full read"),
        ("replication", "dirty bitmap"),
        ("backup", "dirty bitmap"),
        ("replication", "dirty bitmap"),
    ]


def test_seeded_from_a_backup_sends_only_what_changed_since(test_vm, shared, tmp_path: Path) -> None:
    """After the test above, the repository's latest backup still has its bitmap on the VM."""
    cli, target, writer = shared["cli"], shared["target"], shared["writer"]
    (point,) = [p for p in cli.points() if p["name"] == test_vm.name][-1:]
    before = writer.count()
    vm = replicate(cli, test_vm, str(target), "--replica-name", "seeded", "--seed-from", f"{cli.repo}:{point['id']}")
    after = writer.count()
    assert vm["cbt"] == "dirty bitmap", vm
    assert any(f"seeded from restore point {point['id']}" in note for note in vm["notes"]), vm["notes"]
    assert vm["sent_bytes"] < 24 * MiB, vm  # the changes since the backup, not the disks
    seeded = record(target / "seeded")["points"]
    assert len(seeded) == 1
    assert before <= records_in(target / "seeded", seeded[0], tmp_path) <= after
    # the backup chain was only read: the next backup is still incremental
    backup = cli.run("vm", "backup", test_vm.name, "--json", timeout=600)
    assert backup.returncode == 0 and backup.json()["vms"][0]["cbt"] == "dirty bitmap", backup.stdout
    remove_bitmaps(test_vm, "surepoint-r" + record(target / "seeded")["id"][:12])


def test_replication_over_ssh(test_vm, shared, sshd) -> None:  # noqa: F811 - the fixture
    cli, target = shared["cli"], shared["target"]
    url = sshd.url(target)
    vm = replicate(cli, test_vm, url, env=sshd.env())
    assert vm["cbt"] == "dirty bitmap", vm
    assert vm["sent_bytes"] < 24 * MiB
    listed = cli.run("replica", "list", url, "--json", env=sshd.env(), check=True).json()["replicas"]
    (ours,) = [r for r in listed if r["name"] == f"{test_vm.name}-replica"]
    assert ours["points"][-1]["id"] == vm["point"]


def test_missing_bitmap_falls_back_to_checksums(test_vm, shared, tmp_path: Path) -> None:
    cli, target, writer = shared["cli"], shared["target"], shared["writer"]
    bitmaps = replica_bitmaps(test_vm, replica_dir(target, test_vm))
    with test_vm.qmp() as qmp:  # as if the VM had been restarted from disks that cannot keep bitmaps
        for node, names in bitmaps.items():
            for name in names:
                qmp.execute("block-dirty-bitmap-remove", node=node, name=name)
    before = writer.count()
    vm = replicate(cli, test_vm, str(target))
    after = writer.count()
    assert vm["cbt"] == "checksum compare", vm
    assert any("is missing" in note and "comparing checksums" in note for note in vm["notes"]), vm["notes"]
    assert vm["compared_bytes"] == sum(
        d["virtual_size"] for d in record(replica_dir(target, test_vm))["source"]["disks"]
    )
    assert vm["sent_bytes"] < 24 * MiB, vm  # what differs, not the disks
    point = record(replica_dir(target, test_vm))["points"][-1]
    assert before <= records_in(replica_dir(target, test_vm), point, tmp_path) <= after
    # and the chain goes on from the new point's bitmap
    assert replicate(cli, test_vm, str(target))["cbt"] == "dirty bitmap"


def test_killed_cycle_leaves_the_last_point_and_the_next_completes(test_vm, shared, tmp_path: Path) -> None:
    cli, target = shared["cli"], shared["target"]
    replica = replica_dir(target, test_vm)
    good = record(replica)["points"]
    disks = replica / "disks"
    known = set(os.listdir(disks))
    # --full: a cycle comparing every block, long enough to be killed in the middle of its transfer
    proc = subprocess.Popen(
        [SUREPOINT, "replicate", "vm", test_vm.name, "--to", str(target), "--full"],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    # the new overlay exists and QEMU has opened the view's temporary image: the cycle is under way
    while not (set(os.listdir(disks)) - known) or not fleece_open(test_vm):
        assert proc.poll() is None, "the cycle ended before it could be killed"
        assert time.monotonic() < deadline, "the cycle did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # its storage daemon died with it: nothing keeps the replica's files open
    deadline = time.monotonic() + 10
    while processes_using(replica):
        assert time.monotonic() < deadline, f"left running: {processes_using(replica)}"
        time.sleep(0.1)
    assert record(replica)["points"] == good  # nothing committed; the last point still reads
    assert records_in(replica, good[-1], tmp_path) > 0

    vm = replicate(cli, test_vm, str(target))
    assert vm["cbt"] == "dirty bitmap", vm  # the latest point's bitmap survived the killed cycle
    assert vm["consistency"] == "filesystem", vm  # a guest left frozen by the killed cycle is thawed first
    assert view_left(test_vm) == []
    assert set(os.listdir(disks)) == {
        os.path.basename(f) for p in record(replica)["points"] for f in p["files"].values()
    }
    assert all(len(names) == 1 for names in replica_bitmaps(test_vm, replica).values())
