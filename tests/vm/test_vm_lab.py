"""`surepoint lab verify`: restore points of the test VM booted in an isolated lab and tested.

Two restore points of the test guest play a database VM (10.0.2.15, PostgreSQL listening on the
network) and an application VM (10.0.2.16) that queries it. In production the guest sits on QEMU's
user-mode network, where 10.0.2.2 is this host: the control that a host listener is reachable from
outside the lab. Inside the lab the same connection attempts must fail and the listener must see
nothing. Then a restore point whose database was damaged on purpose, and a lab killed mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SUREPOINT, Cli
from tests.consistency.helpers import events, find_event
from tests.security.pause import Pause, last_line, paused_at
from tests.vm.test_vm_writers import ARCHIVE, PG_SERVICE, archived, guest_pg, pruned_in, psql, write_job  # noqa: F401

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.usefixtures("no_surepoint_bitmaps")]

NETWORK_FILE = "/etc/systemd/network/10-surepoint-lab.network"
DB_ADDRESS = "10.0.2.15"
APP_ADDRESS = "10.0.2.16"
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user-mode network: this host; inside the lab: the lab's bridge
ROWS = 137


def set_guest_address(test_vm, address: str) -> None:
    """The guest's static address on its network card (systemd-networkd), kept across boots."""
    config = f"[Match]\nName=en*\n\n[Network]\nAddress={address}/24\nGateway={HOST_FROM_GUEST}\n"
    with test_vm.agent() as ga:
        ga.write_file(NETWORK_FILE, config.encode())
    test_vm.run(["systemctl", "enable", "systemd-networkd"], timeout=60)
    test_vm.run(["systemctl", "restart", "systemd-networkd"], timeout=60)
    deadline = time.monotonic() + 60
    while address not in test_vm.run(["ip", "-4", "-o", "addr", "show"]).decode():
        assert time.monotonic() < deadline, "the guest's network did not come up"
        time.sleep(0.5)


def guest_connects(test_vm, address: str, port: int) -> bool:
    """Whether the guest can open a TCP connection to address:port (bash /dev/tcp)."""
    with test_vm.agent() as ga:
        result = ga.exec(["timeout", "10", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"], timeout=30)
    return result.ok


def host_address() -> str | None:
    """This host's primary address (where a default route would leave from), if it has one."""
    proc = subprocess.run(["ip", "-j", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        return json.loads(proc.stdout)[0]["prefsrc"]
    return None


class Listener:
    """A TCP listener on every host address that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted.append(peer[0])
            conn.close()

    def close(self) -> None:
        self.sock.close()


def lab_leftovers(lab_dir: Path) -> dict[str, list[str]]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    qemus = subprocess.run(["pgrep", "-af", "qemu-system.*-name lab-"], capture_output=True, text=True).stdout
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if str(lab_dir) in line]
    return {
        "namespaces": [n.split()[0] for n in namespaces.splitlines() if n.startswith("surepoint-lab-")],
        "qemu": qemus.splitlines(),
        "mounts": mounts,
        "lab records": [p.name for p in lab_dir.iterdir()] if lab_dir.exists() else [],
    }


def write_lab(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def lab_cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    work = tmp_path_factory.mktemp("lab")
    cli = Cli(work)
    cli.env["SUREPOINT_LAB_DIR"] = str(work / "labs")
    cli.run("init", "--encryption", "none", check=True)
    return cli


@pytest.fixture(scope="module")
def lab_points(test_vm, guest_pg, lab_cli: Cli, tmp_path_factory) -> Iterator[dict]:  # noqa: F811
    """Restore point "db" (10.0.2.15, PostgreSQL on the network, a job with logs after-verify) and
    restore point "app" (10.0.2.16) of the test guest."""
    work = tmp_path_factory.mktemp("lab-points")
    psql(
        test_vm,
        "ALTER SYSTEM SET listen_addresses = '*'",
        db="postgres",
    )
    hba = "/etc/postgresql/15/main/pg_hba.conf"
    with test_vm.agent() as ga:
        original_hba = ga.read_file(hba)
        ga.write_file(hba, original_hba + b"\nhost all all 10.0.2.0/24 trust\n")
    test_vm.run(["systemctl", "enable", "postgresql"], timeout=60)  # the restored VM starts its database
    test_vm.run(["systemctl", "restart", PG_SERVICE], timeout=180)
    psql(
        test_vm,
        "DROP TABLE IF EXISTS lab_orders",
        "CREATE TABLE lab_orders (id int PRIMARY KEY, item text NOT NULL)",
        f"INSERT INTO lab_orders SELECT g, 'item ' || g FROM generate_series(1, {ROWS}) g",
        "CREATE INDEX ON lab_orders (item)",
    )
    try:
        set_guest_address(test_vm, DB_ADDRESS)
        job = write_job(work / "db-job.toml", test_vm.name, fallback="require", logs="after-verify")
        db = lab_cli.run("backup", "--job", str(job), "--json", check=True, timeout=600).json()
        db_point = db["id"]
        archive_at_db = archived(test_vm)
        set_guest_address(test_vm, APP_ADDRESS)
        app = lab_cli.run("backup", "vm", test_vm.name, "--json", check=True, timeout=600).json()
        yield {
            "db": db_point,
            "app": app["vms"][0]["restore_point"],
            "archive_at_db": archive_at_db,
            "work": work,
        }
    finally:
        with contextlib.suppress(Exception):
            test_vm.run(["rm", "-f", NETWORK_FILE])
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "disable", "--now", "systemd-networkd.socket", "systemd-networkd"], timeout=60)
        with contextlib.suppress(Exception):  # back to a card without an address, as the guest boots
            flush = "for i in /sys/class/net/en*; do ip addr flush dev ${i##*/}; done"
            test_vm.run(["sh", "-c", flush])
        with contextlib.suppress(Exception):  # the data disk is small (256 MiB): empty the archive this module filled
            test_vm.run(["find", ARCHIVE, "-mindepth", "1", "-type", "f", "-delete"])
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "disable", "postgresql"], timeout=60)
            with test_vm.agent() as ga:
                ga.write_file(hba, original_hba)
            psql(test_vm, "ALTER SYSTEM RESET listen_addresses", "DROP TABLE IF EXISTS lab_orders", db="postgres")


def test_lab_boots_group_then_app_isolated_and_cleans_up(test_vm, lab_points, lab_cli: Cli, tmp_path: Path) -> None:
    listener = Listener()
    try:
        outside = [HOST_FROM_GUEST] + ([host_address()] if host_address() else [])
        # control: outside the lab, the production guest reaches the host's listener
        assert guest_connects(test_vm, HOST_FROM_GUEST, listener.port)
        assert listener.accepted, "the control connection from the production guest never arrived"
        seen_before = len(listener.accepted)
        probe = " ".join(outside)
        escape = (
            f'for a in {probe}; do timeout 5 bash -c "exec 3<>/dev/tcp/$a/{listener.port}" '
            "&& { echo reached $a; exit 0; }; echo blocked $a; done; exit 1"
        )
        lab = write_lab(
            tmp_path / "lab.toml",
            f"""
[lab]
timeout = 1200
addresses = ["{HOST_FROM_GUEST}/24"]

[[group]]
name = "db"
restore_point = "{lab_points["db"]}"
boot_timeout = 400
[[group.test]]
type = "ping"
[[group.test]]
type = "port"
port = 5432
[[group.test]]
type = "postgresql"
database = "app"
query = "SELECT count(*) FROM lab_orders"
expect = "{ROWS}"

[[verify]]
vm = "*"
boot_timeout = 400
[[verify.test]]
type = "ping"
address = "{APP_ADDRESS}"
[[verify.test]]
type = "script"
name = "app queries the db VM"
argv = ["psql", "-h", "{DB_ADDRESS}", "-U", "postgres", "-d", "app", "-XAtc", "SELECT count(*) FROM lab_orders"]
[[verify.test]]
type = "script"
name = "no way out of the lab"
argv = ["bash", "-c", '{escape}']
expect_exit = 1
""",
        )
        lab_cli.run("verify", lab_points["app"], check=True)  # chunks intact, but a VM is verified only once it booted
        assert {p["id"]: p for p in lab_cli.points()}[lab_points["app"]]["state"] == "intact"
        started = time.monotonic()
        result = lab_cli.run(
            "lab", "verify", lab_points["app"], "--group", str(lab), "--report-dir", str(tmp_path / "reports"),
            timeout=1500,
        )  # fmt: skip
        took = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(listener.accepted) == seen_before, f"a lab VM reached the host: {listener.accepted}"
    finally:
        listener.close()
    text = next((tmp_path / "reports").glob("lab-*.txt")).read_text()
    report = json.loads(next((tmp_path / "reports").glob("lab-*.json")).read_text())
    print(f"\n{text}lab verify took {took:.1f} s")
    db, app = report["vms"]
    assert (db["role"], db["restore_point"], db["outcome"]) == ("group", lab_points["db"], "passed"), db
    assert (app["role"], app["restore_point"], app["outcome"]) == ("verified", lab_points["app"], "passed"), app
    assert [t["type"] for t in db["tests"]] == ["heartbeat", "ping", "port", "postgresql"]
    assert DB_ADDRESS in db["addresses"] and APP_ADDRESS in app["addresses"], (db, app)
    by_name = {t["name"]: t for t in app["tests"]}
    assert by_name["app queries the db VM"]["output"].strip().splitlines()[-1] == str(ROWS)
    assert "blocked" in by_name["no way out of the lab"]["output"]
    assert "reached" not in by_name["no way out of the lab"]["output"]
    # both VMs have the same MAC in production: the lab gave the second one a MAC of its own
    macs = [n["mac"] for vm in (db, app) for n in vm["nics"]]
    assert len(set(macs)) == 2, macs
    assert report["integrity"] == {lab_points["db"]: "verified", lab_points["app"]: "verified"}
    assert report["cleanup"] == []
    assert lab_leftovers(Path(lab_cli.env["SUREPOINT_LAB_DIR"])) == {
        "namespaces": [], "qemu": [], "mounts": [], "lab records": []
    }  # fmt: skip
    listed = {p["id"]: p for p in lab_cli.points()}
    for point in (lab_points["db"], lab_points["app"]):
        assert (listed[point]["state"], listed[point]["recovery"]) == ("verified", "verified"), listed[point]
    # the db point's job (logs after-verify) waited for this: WAL older than its backup is pruned now
    prune = find_event(events(lab_cli, lab_points["db"]), "postgresql", "prune-logs", "ok")
    pruned = pruned_in(prune["message"])
    assert pruned and pruned <= lab_points["archive_at_db"], prune
    assert not pruned & archived(test_vm), "the pruned WAL segments are still in the guest's archive"


def test_damaged_database_fails_the_lab_and_keeps_logs(test_vm, lab_points, lab_cli: Cli, tmp_path: Path) -> None:
    psql(test_vm, "DROP DATABASE IF EXISTS labbroken", "CREATE DATABASE labbroken", db="postgres")
    try:
        psql(
            test_vm,
            "CREATE TABLE stock (id int PRIMARY KEY, qty int)",
            "INSERT INTO stock SELECT g, g FROM generate_series(1, 500) g",
            "CHECKPOINT",
            db="labbroken",
        )
        relpath = psql(test_vm, "SELECT pg_relation_filepath('stock')", db="labbroken").strip()
        test_vm.run(["systemctl", "stop", PG_SERVICE], timeout=180)
        with test_vm.agent() as ga:  # garbage over the first page's header: "invalid page in block 0"
            ga.write_file("/run/garbage", bytes(range(200, 264 - 8)) + b"\xff" * 8)
        table_file = f"/var/lib/postgresql/15/main/{relpath}"
        test_vm.run(["dd", "if=/run/garbage", f"of={table_file}", "bs=64", "count=1", "conv=notrunc"])
        test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)
        job = write_job(tmp_path / "job.toml", test_vm.name, fallback="require", logs="after-verify")
        backup = lab_cli.run("backup", "--job", str(job), "--json", check=True, timeout=600).json()
        point = backup["id"]
        archive_before = archived(test_vm)
        lab = write_lab(
            tmp_path / "lab.toml",
            """
[lab]
timeout = 900
network = "none"

[[verify]]
boot_timeout = 400
[[verify.test]]
type = "postgresql"
database = "labbroken"
query = "SELECT sum(qty) FROM stock"
""",
        )
        result = lab_cli.run(
            "lab", "verify", point, "--group", str(lab), "--report-dir", str(tmp_path / "r"), "--json", timeout=1200
        )
        assert result.returncode == 4, result.stdout + result.stderr
        report = result.json()
        (vm,) = report["vms"]
        assert vm["outcome"] == "failed", vm
        pg = next(t for t in vm["tests"] if t["type"] == "postgresql")
        assert pg["outcome"] == "failed" and "invalid page" in pg["output"], pg
        listed = {p["id"]: p for p in lab_cli.points()}[point]
        assert (listed["state"], listed["recovery"], listed["integrity"]) == ("failed", "failed", "verified"), listed
        # after-verify: the failed lab keeps every log, and so does a later integrity check
        lab_cli.run("verify", point, check=True)
        assert archived(test_vm) >= archive_before
        prunes = [e for e in events(lab_cli, point) if e["component"] == "postgresql" and e["phase"] == "prune-logs"]
        assert prunes and all(e["outcome"] == "pending" for e in prunes), prunes
    finally:
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "start", PG_SERVICE], timeout=180)
        psql(test_vm, "DROP DATABASE IF EXISTS labbroken", db="postgres")


def test_lab_timeout_tears_everything_down(lab_points, lab_cli: Cli, tmp_path: Path) -> None:
    lab = write_lab(tmp_path / "lab.toml", "[lab]\ntimeout = 8\n\n[[verify]]\nboot_timeout = 400\n")
    job = lab_points["work"] / "db-job.toml"  # a VM job stands for its latest restore point
    result = lab_cli.run("lab", "verify", str(job), "--group", str(lab), "--report-dir", str(tmp_path), "--json")
    assert result.returncode == 4, result.stdout + result.stderr
    (vm,) = result.json()["vms"]
    assert vm["restore_point"] == lab_cli.points()[-1]["id"], vm
    assert vm["outcome"] == "failed" and re.search(r"guest agent within [0-8] s", vm["reason"]), vm
    assert result.json()["cleanup"] == []
    assert lab_leftovers(Path(lab_cli.env["SUREPOINT_LAB_DIR"])) == {
        "namespaces": [], "qemu": [], "mounts": [], "lab records": []
    }  # fmt: skip


def test_killed_lab_is_cleaned_by_the_next_command(lab_points, lab_cli: Cli, tmp_path: Path) -> None:
    lab_dir = Path(lab_cli.env["SUREPOINT_LAB_DIR"])
    lab = write_lab(tmp_path / "lab.toml", '[lab]\naddresses = ["10.0.2.2/24"]\n')
    recovery_before = {p["id"]: p["recovery"] for p in lab_cli.points()}
    proc = subprocess.Popen(
        [SUREPOINT, "lab", "verify", lab_points["app"], "--group", str(lab), "--report-dir", str(tmp_path)],
        env=lab_cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not lab_leftovers(lab_dir)["qemu"]:  # QEMU started: the namespace and the mount exist too
            assert proc.poll() is None, "the lab ended before its VM started"
            assert time.monotonic() < deadline, "the lab's VM did not start within 120 s"
            time.sleep(0.2)
        time.sleep(2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = lab_leftovers(lab_dir)
    assert left["namespaces"] and left["qemu"] and left["mounts"] and left["lab records"], left
    listing = lab_cli.run("lab", "list", "--json", check=True).json()["labs"]
    assert [lab["alive"] for lab in listing] == [False], listing
    cleaned = lab_cli.run("lab", "clean", "--json", check=True).json()
    assert len(cleaned["cleaned"]) == 1, cleaned
    deadline = time.monotonic() + 30
    while any(lab_leftovers(lab_dir).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lab_leftovers(lab_dir) == {"namespaces": [], "qemu": [], "mounts": [], "lab records": []}
    # a killed lab records no verification
    assert {p["id"]: p["recovery"] for p in lab_cli.points()} == recovery_before


def test_an_interrupted_lab_is_torn_down(lab_points, lab_cli: Cli, tmp_path: Path) -> None:
    """SIGTERM while the lab tests its booted VM: one line says the lab is torn down, and it is (no
    namespace, QEMU, mount or record), no lock stays, and no verification is recorded."""
    lab_dir = Path(lab_cli.env["SUREPOINT_LAB_DIR"])
    lab = write_lab(tmp_path / "lab.toml", '[lab]\naddresses = ["10.0.2.2/24"]\n')
    recovery_before = {p["id"]: p["recovery"] for p in lab_cli.points()}
    pause = Pause(tmp_path / "pause", "lab-test")
    argv = [SUREPOINT, "lab", "verify", lab_points["app"], "--group", str(lab), "--report-dir", str(tmp_path / "r")]
    with paused_at(pause, argv, lab_cli.env, timeout=600) as proc:
        assert lab_leftovers(lab_dir)["qemu"], "the lab's VM should be running at this checkpoint"
        os.kill(proc.pid, signal.SIGTERM)
        _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    last = last_line(err)
    assert last.startswith("error: interrupted by SIGTERM: ") and "torn down" in last, err
    assert lab_leftovers(lab_dir) == {"namespaces": [], "qemu": [], "mounts": [], "lab records": []}
    assert [p for p in (lab_cli.repo / "locks").iterdir() if not p.name.endswith(".tmp")] == []
    assert {p["id"]: p["recovery"] for p in lab_cli.points()} == recovery_before  # nothing recorded
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # no report written
