"""`surepoint backup vm` on the running test VM, through the real CLI: consistency under load,
dirty-bitmap CBT and its fallback, a guest agent that is missing or hangs, several VMs in one job.

The CLI opens its own QMP and guest-agent connections, and each of those QEMU sockets takes one
client at a time: the tests hold no connection while the CLI runs (TestVm.run, short `with` blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.conftest import SUREPOINT, Cli, Result, sha256_file
from tests.security.pause import Pause, interrupt, last_line

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_surepoint_bitmaps")]

MiB = 1 << 20

# Appends numbered records "N <body> <md5 of 'N <body>'>\n", one write(2) and one fsync each,
# for at most SECONDS seconds (so a test that dies cannot leave it running for long).
RECORD_WRITER = r"""
use strict; use warnings; use IO::Handle; use Digest::MD5 qw(md5_hex);
my ($path, $seconds) = @ARGV;
open(my $f, ">>", $path) or die "open $path: $!";
my $end = time() + $seconds;
for (my $n = 1; time() < $end; $n++) {
    my $body = "$n " . ("abcdefghij" x (1 + $n % 7));
    my $line = $body . " " . md5_hex($body) . "\n";
    syswrite($f, $line) == length($line) or die "write: $!";
    $f->sync or die "fsync: $!";
}
"""


# -- helpers ----------------------------------------------------------------------------------


def backup_vm(cli: Cli, *args: str, timeout: float = 300) -> tuple[Result, float]:
    """`surepoint backup vm ARGS --json`; the result and its wall time."""
    started = time.monotonic()
    result = cli.run("backup", "vm", *args, "--json", timeout=timeout)
    return result, time.monotonic() - started


def only_vm(result: Result) -> dict:
    vms = result.json()["vms"]
    assert len(vms) == 1, vms
    return vms[0]


def good_backup(cli: Cli, *args: str) -> tuple[dict, float]:
    result, seconds = backup_vm(cli, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    vm = only_vm(result)
    assert vm["status"] in ("ok", "warning"), vm
    return vm, seconds


def show(cli: Cli, ref: str) -> dict:
    return cli.run("show", ref, "--json", check=True).json()


def disk_number(point: dict, name: str) -> int:
    return next(d["number"] for d in point["disks"] if d["name"] == name)


def restore_disk(cli: Cli, ref: str, number: int, dest: Path) -> Path:
    cli.run("restore", ref, "--disk", str(number), "--to", str(dest), check=True)
    return dest


def restored_hashes(cli: Cli, ref: str, workdir: Path) -> dict[str, str]:
    """sha256 of every disk of a restore point, restored to raw files (deleted again after hashing)."""
    workdir.mkdir()
    hashes = {}
    for disk in show(cli, ref)["disks"]:
        image = restore_disk(cli, ref, disk["number"], workdir / f"{disk['name']}.raw")
        hashes[disk["name"]] = sha256_file(image)
        image.unlink()
    return hashes


def events(cli: Cli, ref: str | None = None) -> list[dict]:
    return cli.run("events", *([ref] if ref else []), "--json", "--limit", "1000", check=True).json()


@contextlib.contextmanager
def paused(test_vm) -> Iterator[None]:
    """The VM stopped (QMP stop) for the with-block: every backup inside sees the same disks."""
    with test_vm.qmp() as qmp:
        qmp.execute("stop")
        assert qmp.execute("query-status")["running"] is False
    try:
        yield
    finally:
        with test_vm.qmp() as qmp:
            qmp.execute("cont")


def qemu_state(test_vm) -> dict:
    """What a backup may leave in QEMU: bitmaps per disk, block jobs, exports, temporary nodes."""
    with test_vm.qmp() as qmp:
        nodes = qmp.query_named_block_nodes()
        return {
            "bitmaps": {
                n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps", []))
                for n in nodes
                if n["node-name"] in test_vm.disks
            },
            "jobs": qmp.query_block_jobs(),
            "exports": qmp.execute("query-block-exports"),
            "temporary_nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("sp-")],
        }


def bitmap_of(cli: Cli, point_id: str) -> str:
    """The dirty bitmap a restore point left on the VM's disks (named per repository and point)."""
    name = show(cli, point_id)["metadata"]["vm"]["bitmap"]
    assert name.startswith("surepoint-") and name.endswith(point_id), name
    return name


def ours(bitmaps: dict[str, list[str]]) -> dict[str, list[str]]:
    return {node: [b for b in names if b.startswith("surepoint-")] for node, names in bitmaps.items()}


def theirs(bitmaps: dict[str, list[str]]) -> dict[str, list[str]]:
    return {node: [b for b in names if not b.startswith("surepoint-")] for node, names in bitmaps.items()}


def assert_no_view_left(state: dict) -> None:
    assert state["jobs"] == []
    assert state["exports"] == []
    assert state["temporary_nodes"] == []


def write_inventory(path: Path, name: str, qmp: str, guest_agent: str) -> Path:
    path.write_text(f'[vm.{name}]\nqmp = "{qmp}"\nguest_agent = "{guest_agent}"\n')
    return path


def count_lines(test_vm, path: str) -> int:
    """Lines in a guest file (0 while it does not exist)."""
    with test_vm.agent() as ga:
        result = ga.exec(["wc", "-l", path])
    return int(result.stdout.split()[0]) if result.ok else 0


def check_records(data: bytes) -> int:
    """Every record whole, its checksum right, numbered 1, 2, 3...; returns how many."""
    assert data, "no records at all"
    # Filesystem-consistent: the freeze waits for write(2) calls in flight and flushes what they
    # wrote, and each record is one write(2), so the file holds whole records only (no torn tail).
    assert data.endswith(b"\n"), f"torn last record: {data[-120:]!r}"
    lines = data[:-1].split(b"\n")
    for n, line in enumerate(lines, start=1):
        body, _, digest = line.rpartition(b" ")
        assert hashlib.md5(body).hexdigest().encode() == digest, f"record {n} damaged: {line!r}"
        assert body == b"%d " % n + b"abcdefghij" * (1 + n % 7), f"record {n} out of sequence: {line!r}"
    return len(lines)


class FreezeSwallowingAgent:
    """A guest-agent socket in front of the real one: passes everything through, except that the
    reply to guest-fsfreeze-freeze never comes back. The real guest does freeze; the backup only
    sees a hung agent, times out, and must thaw it (the thaw goes through)."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream
        self.path = str(path)
        self.freezes = 0
        self.thaws = 0
        self.swallowed: list[dict] = []  # the freeze replies the caller never got
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(4)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="fake-qga", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
                up.connect(self.upstream)
                self._relay(conn, up)

    def _relay(self, client: socket.socket, agent: socket.socket) -> None:
        swallow: set[str] = set()
        from_client = b""
        from_agent = b""
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, "client")
            sel.register(agent, selectors.EVENT_READ, "agent")
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.data == "client":
                        agent.sendall(data)
                        from_client += data
                        while b"\n" in from_client:
                            line, from_client = from_client.split(b"\n", 1)
                            request = _json(line)
                            if request.get("execute") == "guest-fsfreeze-freeze":
                                self.freezes += 1
                                swallow.add(str(request.get("id")))
                            elif request.get("execute") == "guest-fsfreeze-thaw":
                                self.thaws += 1
                    else:
                        from_agent += data
                        while b"\n" in from_agent:
                            line, from_agent = from_agent.split(b"\n", 1)
                            reply = _json(line)
                            if str(reply.get("id")) in swallow:
                                self.swallowed.append(reply)
                            else:
                                client.sendall(line + b"\n")


def _json(line: bytes) -> dict:
    try:
        msg = json.loads(line.lstrip(b"\xff"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return msg if isinstance(msg, dict) else {}


# -- tests ------------------------------------------------------------------------------------


def test_consistent_view_while_the_guest_appends_records(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    log = "/data/records.log"
    test_vm.run(["rm", "-f", log])
    with test_vm.agent() as ga:
        writer = ga.exec_start(["perl", "-e", RECORD_WRITER, log, "300"], capture=True)
    try:
        deadline = time.monotonic() + 60
        while (before := count_lines(test_vm, log)) < 100:
            assert time.monotonic() < deadline, "the record writer does not write"
            time.sleep(0.5)
        vm, seconds = good_backup(cli, test_vm.name)
        after = count_lines(test_vm, log)
        with test_vm.agent() as ga:
            status = ga.exec_status(writer)
            assert not status.get("exited"), f"the record writer stopped during the backup: {status}"
    finally:
        with test_vm.agent() as ga:
            ga.exec(["kill", str(writer)])
    assert vm["consistency"] == "filesystem", vm
    assert vm["status"] == "ok", vm
    point = show(cli, vm["restore_point"])
    assert point["consistency"] == "filesystem"
    assert point["metadata"]["writers"]["guest-fsfreeze"]["frozen_filesystems"] >= 2  # / and /data

    image = restore_disk(cli, vm["restore_point"], disk_number(point, "data"), tmp_path / "data.raw")
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /records.log", str(image)], capture_output=True, check=True)
    found = check_records(cat.stdout)
    print(
        f"\nrecords: {before} written before the backup started, {found} in the backup, {after} after it "
        f"(backup {seconds:.1f} s, read {vm['read_bytes'] / MiB:.0f} MiB)"
    )
    # every record acknowledged before the backup began is in it; none written after it ended
    assert before <= found <= after
    image.unlink()
    test_vm.run(["rm", "-f", log])


def test_incremental_reads_only_the_changed_blocks(test_vm, cli: Cli, tmp_path: Path) -> None:
    # 256 KiB chunks (a user's choice at init): what is read then shows the bitmap's precision (64 KiB)
    # rather than the rounding to larger chunks (the default is 1 MiB)
    cli.run("init", "--chunk-size", str(256 * 1024), check=True)
    # every byte (--no-skip-free): the incremental is compared bit for bit with a full read below
    full, full_seconds = good_backup(cli, test_vm.name, "--no-skip-free")
    assert full["cbt"] == "full read" and full["consistency"] == "filesystem", full
    written = 16 * MiB
    test_vm.run(["dd", "if=/dev/urandom", "of=/data/incr.bin", "bs=1M", "count=16", "conv=fsync", "status=none"])
    test_vm.run(["sync"])
    incr, incr_seconds = good_backup(cli, test_vm.name, "--no-skip-free")
    print(
        f"\nfull backup: {full_seconds:.1f} s ({full['duration_seconds']:.1f} s reading), "
        f"read {full['read_bytes'] / MiB:.0f} MiB of {full['size'] / MiB:.0f} MiB; "
        f"incremental after writing {written // MiB} MiB: {incr_seconds:.1f} s "
        f"({incr['duration_seconds']:.2f} s reading), read {incr['read_bytes'] / MiB:.1f} MiB"
    )
    assert incr["cbt"] == "dirty bitmap", incr
    assert incr["consistency"] == "filesystem"
    point = show(cli, incr["restore_point"])
    read = {d["name"]: d["read_bytes"] for d in point["disks"]}
    print("read per disk: " + ", ".join(f"{name} {n / MiB:.0f} MiB" for name, n in read.items()))
    # /data: the 16 MiB file (in two extents, each straddling a chunk boundary), plus a few 64 KiB
    # blocks of ext4 metadata (superblock, group descriptors, bitmaps, inodes, journal), a chunk each;
    # /: only what the guest itself wrote meanwhile
    assert written <= read["data"] <= written + 4 * MiB, read
    assert read["root"] <= 4 * MiB, read
    assert incr["read_bytes"] == sum(read.values()) <= written + 6 * MiB
    assert incr["read_bytes"] < full["read_bytes"] / 20
    assert point["parent"] == full["restore_point"]
    assert point["metadata"]["vm"]["cbt"] == "dirty bitmap"
    assert all(d["metadata"]["read_mode"] == "changed blocks only" for d in point["disks"])
    state = qemu_state(test_vm)
    assert ours(state["bitmaps"]) == {d: [bitmap_of(cli, incr["restore_point"])] for d in test_vm.disks}
    assert_no_view_left(state)

    # more changes: a new file, and part of the old one overwritten in place
    test_vm.run(["dd", "if=/dev/urandom", "of=/data/incr2.bin", "bs=1M", "count=3", "conv=fsync", "status=none"])
    test_vm.run(
        ["dd", "if=/dev/urandom", "of=/data/incr.bin", "bs=64k", "count=5", "seek=37", "conv=notrunc,fsync"]
        + ["status=none"]
    )
    with paused(test_vm):  # one instant for both: the incremental must equal the full backup
        same, _ = good_backup(cli, test_vm.name, "--no-quiesce", "--no-skip-free")
        reference, _ = good_backup(cli, test_vm.name, "--no-quiesce", "--full", "--no-skip-free")
    assert same["cbt"] == "dirty bitmap" and same["read_bytes"] < 16 * MiB, same
    assert reference["cbt"] == "full read", reference
    assert same["consistency"] == reference["consistency"] == "crash"  # not quiesced, but paused
    incremental_disks = restored_hashes(cli, same["restore_point"], tmp_path / "incremental")
    full_disks = restored_hashes(cli, reference["restore_point"], tmp_path / "full")
    assert set(incremental_disks) == set(test_vm.disks)
    assert incremental_disks == full_disks
    test_vm.run(["rm", "-f", "/data/incr.bin", "/data/incr2.bin"])


def test_lost_bitmap_falls_back_to_a_full_read(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    base, _ = good_backup(cli, test_vm.name)
    bitmap = bitmap_of(cli, base["restore_point"])
    with test_vm.qmp() as qmp:
        assert bitmap in [b["name"] for b in qmp.block_node("data")["dirty-bitmaps"]]
        qmp.execute("block-dirty-bitmap-remove", node="data", name=bitmap)
    # written after the bitmap is gone: nothing tracks it, only a full read finds it
    test_vm.run(["dd", "if=/dev/urandom", "of=/data/untracked.bin", "bs=1M", "count=4", "conv=fsync", "status=none"])
    with paused(test_vm):
        fallback, _ = good_backup(cli, test_vm.name, "--no-quiesce")
        reference, _ = good_backup(cli, test_vm.name, "--no-quiesce", "--full")
    assert fallback["cbt"] == "full read, compared", fallback
    assert any(f"dirty bitmap {bitmap} is missing on data" in n and "in full" in n for n in fallback["notes"]), fallback
    assert fallback["read_bytes"] == reference["read_bytes"] > 500 * MiB
    point = show(cli, fallback["restore_point"])
    assert point["parent"] == base["restore_point"]
    assert point["metadata"]["vm"]["cbt"] == "full read, compared"
    warned = [e for e in events(cli, fallback["restore_point"]) if e["component"] == "cbt"]
    assert warned and warned[0]["outcome"] == "warning" and "missing" in warned[0]["message"], warned
    assert restored_hashes(cli, fallback["restore_point"], tmp_path / "fallback") == restored_hashes(
        cli, reference["restore_point"], tmp_path / "full"
    )
    # the chain goes on from the full read: the next backup uses the bitmap it left
    state = qemu_state(test_vm)
    assert ours(state["bitmaps"]) == {d: [bitmap_of(cli, reference["restore_point"])] for d in test_vm.disks}
    test_vm.run(["rm", "-f", "/data/untracked.bin"])


def test_missing_vm_is_a_one_line_error(cli: Cli) -> None:
    cli.run("init", check=True)
    result = cli.run("backup", "vm", "no-such-vm")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backup of VM no-such-vm failed: no VM named"), result.stderr
    assert "no-such-vm" in result.stdout and "failed" in result.stdout  # the summary table
    vm = only_vm(cli.run("backup", "vm", "no-such-vm", "--json"))
    assert vm["status"] == "failed"
    assert vm["error"].startswith("no VM named 'no-such-vm' (running QEMU VMs with a QMP socket:"), vm
    assert cli.points() == []


def test_vm_without_a_guest_agent(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    inventory = write_inventory(tmp_path / "vms.toml", "noagent", test_vm.qmp_path, str(tmp_path / "nothing.sock"))
    others_before = theirs(qemu_state(test_vm)["bitmaps"])

    result, _ = backup_vm(cli, "noagent", "--inventory", str(inventory), "--fallback", "require")
    assert result.returncode == 1
    vm = only_vm(result)
    assert vm["status"] == "failed"
    assert "cannot freeze the guest's filesystems" in vm["error"] and "nothing.sock" in vm["error"], vm
    assert "--fallback require" in vm["error"]
    assert result.stderr.strip().splitlines()[-1] == f"error: backup of VM noagent failed: {vm['error']}"
    assert cli.points() == []
    state = qemu_state(test_vm)
    assert ours(state["bitmaps"]) == {d: [] for d in test_vm.disks}  # no bitmap for a backup that failed
    assert theirs(state["bitmaps"]) == others_before
    assert_no_view_left(state)

    result, _ = backup_vm(cli, "noagent", "--inventory", str(inventory), "--fallback", "try")
    assert result.returncode == 0, result.stdout + result.stderr
    vm = only_vm(result)
    assert vm["status"] == "warning" and vm["consistency"] == "crash", vm
    assert any("not frozen" in n and "nothing.sock" in n and "crash-consistent only" in n for n in vm["notes"]), vm
    assert "guest-fsfreeze identify: failed guest agent unavailable" in result.stderr
    point = show(cli, vm["restore_point"])
    assert point["consistency"] == "crash" and point["name"] == "noagent"
    assert any("crash-consistent only" in n for n in point["metadata"]["consistency_failures"])


def test_guest_agent_hung_during_freeze(test_vm, cli: Cli, tmp_path: Path) -> None:
    cli.run("init", check=True)
    fake = FreezeSwallowingAgent(test_vm.qga_path, tmp_path / "qga-hung.sock")
    try:
        inventory = write_inventory(tmp_path / "vms.toml", "hung", test_vm.qmp_path, fake.path)
        args = ("hung", "--inventory", str(inventory))

        # --fallback try: the freeze times out, the guest is thawed, the backup is crash-consistent
        vm, seconds = good_backup(cli, *args, "--fallback", "try")
        assert fake.freezes == 1 and fake.thaws >= 1
        # the real guest did freeze (its reply counts the filesystems), and the backup thawed it
        assert fake.swallowed and fake.swallowed[0]["return"] >= 2, fake.swallowed
        assert vm["status"] == "warning" and vm["consistency"] == "crash", vm
        assert any("did not answer guest-fsfreeze-freeze" in n for n in vm["notes"]), vm
        with test_vm.agent() as ga:
            assert ga.fsfreeze_status() == "thawed"
        print(f"\nbackup through a hung guest agent (--fallback try): {seconds:.1f} s, crash-consistent")
        before = qemu_state(test_vm)
        assert ours(before["bitmaps"]) == {d: [bitmap_of(cli, vm["restore_point"])] for d in test_vm.disks}

        # --fallback require: the job fails before any view is made, and leaves nothing behind
        result, seconds = backup_vm(cli, *args, "--fallback", "require")
        assert fake.freezes == 2 and fake.thaws >= 2
    finally:
        fake.close()
    assert result.returncode == 1
    failed = only_vm(result)
    assert failed["status"] == "failed"
    assert "could not freeze the guest's filesystems" in failed["error"], failed
    assert "did not answer guest-fsfreeze-freeze" in failed["error"] and "--fallback require" in failed["error"]
    assert result.stderr.strip().splitlines()[-1] == f"error: backup of VM hung failed: {failed['error']}"
    print(f"failed backup through a hung guest agent (--fallback require): {seconds:.1f} s: {failed['error']}")
    with test_vm.agent() as ga:
        assert ga.fsfreeze_status() == "thawed"
    after = qemu_state(test_vm)
    assert after["bitmaps"] == before["bitmaps"]  # no new bitmap; the last good backup's bitmap kept
    assert_no_view_left(after)
    assert [p["id"] for p in cli.points()] == [vm["restore_point"]]
    finish = [e for e in events(cli) if e["component"] == "job" and e["phase"] == "finish"]
    assert finish[-1]["outcome"] == "failed" and "could not freeze" in finish[-1]["message"]


def test_several_vms_in_one_job(test_vm, cli: Cli) -> None:
    cli.run("init", check=True)
    listed = cli.run("vm", "list", "--json", check=True).json()
    mine = [v for v in listed if v["name"] == test_vm.name]
    assert mine and mine[0]["qmp"] == test_vm.qmp_path and mine[0]["guest_agent"] == test_vm.qga_path

    result, seconds = backup_vm(cli, test_vm.name, "missingvm", "--parallel", "2")
    assert result.returncode == 1
    by_name = {v["vm"]: v for v in result.json()["vms"]}
    assert set(by_name) == {test_vm.name, "missingvm"}
    assert by_name[test_vm.name]["status"] == "ok" and by_name[test_vm.name]["consistency"] == "filesystem"
    assert by_name["missingvm"]["status"] == "failed"
    assert "no VM named 'missingvm'" in by_name["missingvm"]["error"]
    assert result.stderr.strip().splitlines()[-1].startswith("error: backup of VM missingvm failed: no VM named")
    points = cli.points()
    assert [(p["id"], p["name"]) for p in points] == [(by_name[test_vm.name]["restore_point"], test_vm.name)]
    print(f"\ntwo-VM job (one missing): {seconds:.1f} s")


def test_free_space_in_the_guest_is_skipped(test_vm, cli: Cli, tmp_path: Path) -> None:
    """Through the fleecing export, after the freeze: the guest's ext4 free blocks are not read, a file
    deleted before the backup is gone from the repository, and the restored data disk checks clean."""
    cli.run("init", "--encryption", "none", check=True)
    marker = f"DELETED-{os.getpid()}-{time.time_ns()}"
    test_vm.run(["sh", "-c", f"yes {marker} | head -c 8M > /data/secret.txt && sync && rm /data/secret.txt && sync"])
    overlay = test_vm.disks["data"].read_bytes()  # qcow2 clusters hold guest bytes as they are
    assert marker.encode() in overlay, "the deleted file's bytes should still be on the disk"
    vm, _ = good_backup(cli, test_vm.name)
    assert vm["consistency"] == "filesystem", vm  # frozen: the journal is flushed, the bitmaps are current
    point = show(cli, vm["restore_point"])
    data = next(d for d in point["disks"] if d["name"] == "data")
    volumes = data["metadata"]["free_space"]["volumes"]
    assert [v["status"] for v in volumes if v["kind"] == "ext4"] == ["mapped"], volumes
    assert data["read_bytes"] < data["size"] / 2
    for chunk in (cli.repo / "chunks").rglob("*"):
        if chunk.is_file():
            blob = chunk.read_bytes()
            payload = (
                zstandard.ZstdDecompressor().decompress(blob[8:-32], max_output_size=64 << 20)
                if blob[5]
                else blob[8:-32]
            )
            assert marker.encode() not in payload
    image = restore_disk(cli, vm["restore_point"], data["number"], tmp_path / "data.raw")
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("where", "signum", "code"),
    [("vm-frozen", signal.SIGTERM, 143), ("backup-chunk:3", signal.SIGINT, 130)],
    ids=["while-frozen", "while-reading"],
)
def test_an_interrupted_vm_backup_leaves_the_vm_as_it_was(test_vm, cli: Cli, tmp_path: Path, where, signum, code):
    """Signalled while the guest is frozen, or while the disks are read: the guest is thawed and keeps
    writing, no block job, export or temporary node is left in QEMU, no lock and no restore point in
    the repository, one line says what happened, and the next backup runs as if nothing had been."""
    cli.run("init", check=True)
    name, _, nth = where.partition(":")
    pause = Pause(tmp_path / "pause", name, int(nth or 1))
    # vm-frozen: the guest is frozen at the checkpoint (the command holds its agent). The job runs in
    # a worker thread: the signal ends its wait there, and its next stop point ends the job.
    result = interrupt(pause, [SUREPOINT, "backup", "vm", test_vm.name, "--json"], cli.env, signum, timeout=300)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert last_line(result.stderr).startswith(f"error: interrupted by {signal.Signals(signum).name}"), result.stderr
    with test_vm.agent() as ga:
        assert ga.fsfreeze_status(timeout=10) == "thawed"
    test_vm.run(["sh", "-c", "echo still-writable > /data/after-interrupt && sync"], timeout=30)
    assert_no_view_left(qemu_state(test_vm))
    assert cli.points() == []
    assert [p for p in (cli.repo / "locks").iterdir() if not p.name.endswith(".tmp")] == []
    again, _ = good_backup(cli, test_vm.name)
    assert again["consistency"] == "filesystem", again
    assert_no_view_left(qemu_state(test_vm))
    test_vm.run(["rm", "-f", "/data/after-interrupt"])
