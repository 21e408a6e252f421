"""Failover and failback of the running test VM through the real CLI, in three boots.

While the guest appends numbered, checksummed records (one write(2) and fsync each), it is
replicated twice; a failover at the older point boots a replica that holds a clean prefix of the
records up to that point's freeze; undo returns to replicating and the next cycle sends only the
changes; a planned failover (the source shut down cleanly, a last cycle) boots a replica that holds
every record the source committed; the replica writes 24 MiB and records of its own; a failback
sends about that much back into the original disks, starts the original, and the original holds
all of it. The shared test VM is the source: it is shut down by the planned failover and comes
back through the failback (if anything fails on the way, it is booted again for the tests after).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from surepoint.processes import process_alive
from surepoint.vm.guest_agent import GuestAgent
from tests.conftest import Cli
from tests.vm.conftest import TEST_VM_MAC
from tests.vm.test_vm_backup import RECORD_WRITER, check_records

pytestmark = [pytest.mark.kvm]

MiB = 1 << 20
RECORDS = "/data/failover-records.log"
PLANNED_RECORDS = "/data/planned-records.log"
REPLICA_RECORDS = "/data/replica-records.log"
BLOB = "/data/failback-blob"
BLOB_MIB = 24
NETWORKD_FILE = "/etc/systemd/network/50-surepoint-failover-test.network"
NETWORKD_TEXT = b"[Match]\nName=sp-none0\n\n[Network]\nAddress=192.168.77.5/24\nGateway=192.168.77.1\n"
BOOT_TIMEOUT = 300


class Adopted:
    """A QEMU started by another process (the failback), with what the test VM fixture uses of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if process_alive(self.pid) else 0

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while process_alive(self.pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["qemu"], timeout)
            time.sleep(0.1)
        return 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def agent_run(path: str, argv: list[str], timeout: float = 120) -> bytes:
    with GuestAgent(path, timeout=max(30.0, timeout)) as ga:
        return ga.exec(argv, timeout=timeout, check=True).stdout


def wait_mounted(agent: str, path: str = "/data") -> None:
    """The guest agent answers early in the boot: wait until the data disk is mounted too."""
    deadline = time.monotonic() + 120
    while True:
        with GuestAgent(agent, timeout=30) as ga:
            if ga.exec(["mountpoint", "-q", path]).ok:
                return
        assert time.monotonic() < deadline, f"{path} is not mounted 120 s after the guest agent answered"
        time.sleep(1.0)


def count(path: str, file: str) -> int:
    with GuestAgent(path, timeout=30) as ga:
        done = ga.exec(["wc", "-l", file])
    return int(done.stdout.split()[0]) if done.ok else 0


def start_writer(agent: str, file: str) -> int:
    with GuestAgent(agent, timeout=30) as ga:
        return ga.exec_start(["perl", "-e", RECORD_WRITER, file, "900"], capture=True)


def wait_records(agent: str, file: str, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while (n := count(agent, file)) < at_least:
        assert time.monotonic() < deadline, f"the record writer does not write ({n} records)"
        time.sleep(0.5)
    return n


def records_on_disk(image: str, file: str, workdir: Path) -> bytes:
    """A file of the (stopped) VM's data disk, read with debugfs after a clean-filesystem check."""
    raw = workdir / "data.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(raw)], check=True)
    try:
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        return subprocess.run(
            ["debugfs", "-R", f"cat {file.removeprefix('/data')}", str(raw)], capture_output=True, check=True
        ).stdout
    finally:
        raw.unlink()


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        h = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def test_failover_undo_planned_failover_and_failback(test_vm, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    target = tmp_path / "site"
    figures: dict[str, float] = {}
    writers: list[int] = []
    try:
        scenario(test_vm, tmp_path, cli, target, figures, writers)
    finally:
        cleanup(test_vm, cli, target, writers)
    print("\nfailover figures: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))


def scenario(test_vm, tmp_path: Path, cli: Cli, target: Path, figures: dict, writers: list[int]) -> None:
    replica = target / f"{test_vm.name}-replica"

    def replicate() -> dict:
        r = cli.run("replicate", "vm", test_vm.name, "--to", str(target), "--json", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        (vm,) = r.json()["vms"]
        assert vm["status"] == "ok", vm
        return vm

    def failover(*args: str) -> dict:
        r = cli.run("failover", test_vm.name, "--target", str(target), "--json", *args, timeout=BOOT_TIMEOUT + 300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.json()

    test_vm.run(["rm", "-f", RECORDS, PLANNED_RECORDS, REPLICA_RECORDS, BLOB])
    with test_vm.agent() as ga:  # a static address for the re-IP rule (the guest's own NIC uses DHCP)
        ga.write_file(NETWORKD_FILE, NETWORKD_TEXT)
    writers.append(start_writer(test_vm.qga_path, RECORDS))
    # two points while the guest writes; the failover goes to the older one
    wait_records(test_vm.qga_path, RECORDS, 20)
    before_a = count(test_vm.qga_path, RECORDS)
    first = replicate()
    after_a = count(test_vm.qga_path, RECORDS)
    assert first["consistency"] == "filesystem", first
    replicate()
    disks_before = digests(replica / "disks")

    # the failover at the older point, through a plan: its NIC unplugged, its networkd file re-IPed
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[plan]\ntarget = "{target}"\n[[vm]]\nname = "{test_vm.name}"\npoint = "{first["point"]}"\n'
        'network = ["net0=none"]\n'
        'reip = [{source = "192.168.77.0/24", target = "10.77.0.0/24", gateway = "10.77.0.254"}]\n'
        f'[vm.check]\ncommand = ["test", "-s", "{RECORDS}"]\n'
    )
    at_failover = count(test_vm.qga_path, RECORDS)
    started = time.monotonic()
    r = cli.run("failover", "plan", "run", str(plan), "--json", timeout=BOOT_TIMEOUT + 300)
    figures["failover_seconds"] = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    (step,) = r.json()["vms"]
    assert step["outcome"] == "up" and step["point"] == first["point"], step
    entry = json.loads((replica / "replica.json").read_text())["failover"]
    figures["failover_boot_seconds"] = entry["boot_seconds"]
    assert entry["name"] == f"{test_vm.name}-replica" and entry["guest_agent"] != test_vm.qga_path
    assert "-netdev" not in entry["argv"]  # net0 unplugged: the NIC stays, with no backend
    assert f"virtio-net-pci,addr=0x3,mac={TEST_VM_MAC}" in entry["argv"]
    assert any("Address 192.168.77.5/24 -> 10.77.0.5/24" in change for change in entry["reip"]), entry["reip"]
    wait_mounted(entry["guest_agent"])
    network = agent_run(entry["guest_agent"], ["cat", NETWORKD_FILE]).decode()
    assert "Address=10.77.0.5/24\n" in network and "Gateway=10.77.0.254\n" in network, network
    held = check_records(agent_run(entry["guest_agent"], ["cat", RECORDS]))
    assert before_a <= held <= after_a, (before_a, held, after_a)
    # what this failover loses: the records written after the point's freeze (RPO, in records and seconds)
    figures["rpo_records"] = at_failover - held
    figures["rpo_seconds"] = time.time() - datetime.fromisoformat(first["time"].replace("Z", "+00:00")).timestamp()
    again = cli.run("failover", test_vm.name, "--target", str(target))
    assert again.returncode == 2 and "failed over already" in again.stderr

    # undo: the replica VM and its writes go, the chain is as it was, replication goes on
    undone = cli.run("failover", "plan", "run", str(plan), "--undo", "--json", check=True).json()
    assert undone["vms"][0]["outcome"] == "undone" and undone["vms"][0]["point"] == first["point"]
    assert not process_alive(entry["pid"])
    assert json.loads((replica / "replica.json").read_text())["state"] == "ready"
    assert {k: v for k, v in digests(replica / "disks").items() if k in disks_before} == disks_before
    third = replicate()
    assert third["cbt"] == "dirty bitmap" and third["sent_bytes"] < 64 * MiB, third
    figures["cycle_after_undo_mib"] = third["sent_bytes"] / MiB
    agent_run(test_vm.qga_path, ["kill", str(writers.pop())])

    # planned failover: the source shuts down, a last cycle, then the replica boots with every record
    writers.append(start_writer(test_vm.qga_path, PLANNED_RECORDS))  # it dies with the guest's shutdown
    seen = wait_records(test_vm.qga_path, PLANNED_RECORDS, 20)
    started = time.monotonic()
    entry = failover("--planned")
    figures["planned_failover_seconds"] = time.monotonic() - started
    figures["planned_boot_seconds"] = entry["boot_seconds"]
    assert test_vm.proc is not None and test_vm.proc.wait(30) is not None  # the source is off
    assert entry["planned"] and entry["source"]["last_replication"]["cbt"] == "dirty bitmap", entry
    committed = check_records(records_on_disk(str(test_vm.disks["data"]), PLANNED_RECORDS, tmp_path))
    assert committed >= seen
    wait_mounted(entry["guest_agent"])
    held = check_records(agent_run(entry["guest_agent"], ["cat", PLANNED_RECORDS]))
    assert held == committed  # zero data loss
    figures["planned_records_lost"] = committed - held

    # the replica VM is production now: it writes records of its own and 24 MiB
    ga_path = entry["guest_agent"]
    replica_writer = start_writer(ga_path, REPLICA_RECORDS)
    wait_records(ga_path, REPLICA_RECORDS, 50)
    agent_run(ga_path, ["kill", str(replica_writer)])
    agent_run(ga_path, ["dd", "if=/dev/urandom", f"of={BLOB}", "bs=1M", f"count={BLOB_MIB}", "conv=fsync"])
    blob_sum = agent_run(ga_path, ["sha256sum", BLOB]).split()[0]
    wrote = check_records(agent_run(ga_path, ["cat", REPLICA_RECORDS]))

    started = time.monotonic()
    r = cli.run("failback", test_vm.name, "--target", str(target), "--json", timeout=BOOT_TIMEOUT + 600)
    figures["failback_seconds"] = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.json()
    test_vm.proc = Adopted(report["pid"])  # the original runs again, started by the failback
    figures["failback_sent_mib"] = report["sent_bytes"] / MiB
    figures["disk_mib"] = report["disk_bytes"] / MiB
    figures["failback_write_seconds"] = report["write_seconds"]
    figures["original_boot_seconds"] = report["boot_seconds"]
    assert BLOB_MIB * MiB <= report["sent_bytes"] <= (BLOB_MIB + 48) * MiB, report
    assert report["guest_agent"] == test_vm.qga_path
    wait_mounted(test_vm.qga_path)
    assert test_vm.run(["sha256sum", BLOB]).split()[0] == blob_sum
    assert check_records(test_vm.run(["cat", REPLICA_RECORDS])) == wrote
    assert check_records(test_vm.run(["cat", PLANNED_RECORDS])) == committed
    assert json.loads((replica / "replica.json").read_text())["state"] == "ready"


def cleanup(test_vm, cli: Cli, target: Path, writers: list[int]) -> None:
    """Leave the source VM running as the tests after this one expect it, with nothing of ours."""
    record = target / f"{test_vm.name}-replica" / "replica.json"
    with contextlib.suppress(Exception):
        if json.loads(record.read_text())["state"] == "failed-over":
            cli.run("failover", test_vm.name, "--target", str(target), "--undo")
    if test_vm.proc is None or test_vm.proc.poll() is not None:
        test_vm.start(timeout=600)
    with contextlib.suppress(Exception), test_vm.agent() as ga:
        for pid in writers:
            ga.exec(["kill", str(pid)])
        ga.exec(["rm", "-f", RECORDS, PLANNED_RECORDS, REPLICA_RECORDS, BLOB, NETWORKD_FILE])
    with test_vm.qmp() as qmp:  # this replica's bitmaps go with it
        for node in qmp.query_named_block_nodes():
            for bitmap in node.get("dirty-bitmaps", []):
                if node["node-name"] in test_vm.disks and bitmap.get("name", "").startswith("surepoint-r"):
                    qmp.execute("block-dirty-bitmap-remove", node=node["node-name"], name=bitmap["name"])
