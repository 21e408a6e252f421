"""`surepoint lab open ... --expose`: a VM restore point running in the isolated lab, one door to its PostgreSQL.

A restore point of the test guest with PostgreSQL listening on 10.0.2.15 boots in the lab and the
command returns with the lab up; a table is exported with psql through the door on this host's
127.0.0.1; from inside the lab VM neither this host (a listener on every host address) nor the
production VM (moved to 10.0.2.16 after the backup) can be reached; `lab close` leaves nothing.
A door port already in use is refused before anything boots.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.mount.instant import InstantSession
from surepoint.vm.guest_agent import GuestAgent
from tests.conftest import Cli
from tests.vm.test_vm_lab import HOST_FROM_GUEST, NETWORK_FILE, Listener, host_address, lab_leftovers, set_guest_address

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.usefixtures("no_surepoint_bitmaps")]

PG_SERVICE = "postgresql@15-main"
HBA = "/etc/postgresql/15/main/pg_hba.conf"
LISTEN_CONF = "/etc/postgresql/15/main/conf.d/sp-door.conf"  # Debian's postgresql.conf includes conf.d
LAB_ADDRESS, PRODUCTION_ADDRESS = "10.0.2.15", "10.0.2.16"
DB, ROWS = "spdoor", 321
NOTHING_LEFT = {"namespaces": [], "qemu": [], "mounts": [], "lab records": []}


def psql(test_vm, sql: str, db: str = DB) -> str:
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db]
    return test_vm.run([*argv, "-c", sql], timeout=120).decode().strip()


@pytest.fixture(scope="module")
def door_point(test_vm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, str]]:
    """A restore point of the test guest at 10.0.2.15 with PostgreSQL on the network (database spdoor);
    the production guest is at 10.0.2.16 afterwards."""
    work = tmp_path_factory.mktemp("lab-door")
    cli = Cli(work)
    cli.env["SUREPOINT_LAB_DIR"] = str(work / "labs")
    cli.run("init", "--encryption", "none", check=True)
    with test_vm.agent() as ga:
        was_running = ga.exec(["systemctl", "is-active", "--quiet", PG_SERVICE]).ok
        original_hba = ga.read_file(HBA)
        ga.write_file(HBA, original_hba + b"\nhost all all 10.0.2.0/24 trust\n")
        ga.write_file(LISTEN_CONF, b"listen_addresses = '*'\n")
    test_vm.run(["systemctl", "enable", "postgresql"], timeout=60)  # the booted copy starts its database
    test_vm.run(["systemctl", "restart", PG_SERVICE], timeout=180)
    psql(test_vm, f"DROP DATABASE IF EXISTS {DB}", db="postgres")
    psql(test_vm, f"CREATE DATABASE {DB}", db="postgres")
    psql(test_vm, f"CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name FROM generate_series(1, {ROWS}) g")
    try:
        set_guest_address(test_vm, LAB_ADDRESS)
        backup = cli.run("backup", "vm", test_vm.name, "--json", check=True, timeout=900).json()
        set_guest_address(test_vm, PRODUCTION_ADDRESS)
        yield cli, backup["vms"][0]["restore_point"]
    finally:
        with contextlib.suppress(Exception):
            test_vm.run(["rm", "-f", NETWORK_FILE])
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "disable", "--now", "systemd-networkd.socket", "systemd-networkd"], timeout=60)
        with contextlib.suppress(Exception):
            test_vm.run(["sh", "-c", "for i in /sys/class/net/en*; do ip addr flush dev ${i##*/}; done"])
        with contextlib.suppress(Exception):
            test_vm.run(["systemctl", "disable", "postgresql"], timeout=60)
            with test_vm.agent() as ga:
                ga.write_file(HBA, original_hba)
            test_vm.run(["rm", "-f", LISTEN_CONF])
            psql(test_vm, f"DROP DATABASE IF EXISTS {DB}", db="postgres")
            test_vm.run(["systemctl", "restart" if was_running else "stop", PG_SERVICE], timeout=180)


def reaches(agent_path: str, address: str, port: int) -> bool:
    """Whether the lab VM opens a TCP connection to address:port."""
    with GuestAgent(agent_path, timeout=60) as ga:
        return ga.exec(["timeout", "8", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"], timeout=40).ok


def test_port_in_use_is_refused_before_booting(door_point) -> None:
    cli, point = door_point
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli.run("lab", "open", point, "--expose", f"{LAB_ADDRESS}:5432", "--port", str(port))
    assert result.returncode == 2 and f"127.0.0.1:{port}" in result.stderr, result.stderr
    result = cli.run("lab", "open", point, "--expose", "db01:5432")
    assert result.returncode == 2 and "GUEST_IP:PORT" in result.stderr, result.stderr
    result = cli.run("lab", "close", "nosuchlab")
    assert result.returncode == 2 and "no open lab" in result.stderr, result.stderr
    assert lab_leftovers(Path(cli.env["SUREPOINT_LAB_DIR"])) == NOTHING_LEFT


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql client on this host")
def test_table_exported_through_the_door(test_vm, door_point, tmp_path: Path) -> None:
    cli, point = door_point
    lab_dir = Path(cli.env["SUREPOINT_LAB_DIR"])
    started = time.monotonic()
    opened = cli.run("lab", "open", point, "--expose", f"{LAB_ADDRESS}:5432", "--json", timeout=900)
    assert opened.returncode == 0, opened.stderr
    took = time.monotonic() - started
    lab = opened.json()
    try:
        host, port = lab["door"].split(":")
        assert host == "127.0.0.1"
        # the command returned and the lab stays up
        (listed,) = cli.run("lab", "list", "--json", check=True).json()["labs"]
        assert listed["alive"] and listed["status"] == "open" and listed["door"].startswith(lab["door"]), listed
        # a table exported with psql through the door, while the production guest keeps running
        export = tmp_path / "items.csv"
        copy = subprocess.run(
            ["psql", "-X", "-h", host, "-p", port, "-U", "postgres", "-d", DB, "-c",
             f"\\copy (SELECT * FROM items ORDER BY id) TO '{export}' CSV"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        first_row = time.monotonic() - started
        assert copy.returncode == 0, copy.stderr
        rows = export.read_text().splitlines()
        assert len(rows) == ROWS and rows[0] == "1,item 1" and rows[-1] == f"{ROWS},item {ROWS}"
        print(f"\nlab open returned after {took:.1f} s; table exported through the door after {first_row:.1f} s")
        # from inside the lab: neither this host nor the production VM
        (workdir,) = json.loads((lab_dir / lab["lab_id"] / "lab.json").read_text())["vm_workdirs"]
        agent_path = InstantSession.load(workdir).guest_agent
        listener = Listener()
        try:
            for address in [HOST_FROM_GUEST] + ([host_address()] if host_address() else []):
                assert not reaches(agent_path, address, listener.port), f"the lab VM reached {address}"
            assert not reaches(agent_path, PRODUCTION_ADDRESS, 5432), "the lab VM reached the production VM"
            assert reaches(agent_path, LAB_ADDRESS, 5432)  # control: the probe itself works in the lab
            assert listener.accepted == []
        finally:
            listener.close()
        assert psql(test_vm, "SELECT count(*) FROM items") == str(ROWS)  # production untouched
    finally:
        closed = cli.run("lab", "close", lab["lab_id"], timeout=300)
    assert closed.returncode == 0, closed.stderr
    deadline = time.monotonic() + 30
    while any(lab_leftovers(lab_dir).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lab_leftovers(lab_dir) == NOTHING_LEFT
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
