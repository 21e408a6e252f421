"""The lab network: saved command lines rewritten onto lab taps (pure), and real namespaces (root)."""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from surepoint.errors import InvalidArgument, TargetError
from surepoint.lab.network import (
    BRIDGE,
    NAMESPACE_PREFIX,
    LabNetwork,
    NicPlan,
    attach_to_lab,
    list_lab_namespaces,
    namespace_for,
)
from surepoint.vm.qmp import QmpConnection

QEMU = "qemu-system-x86_64"
LAB_MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
TAP_FORM = "tap,id=n0,ifname=tap0,script=no,downscript=no"


def counter() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"tap{next(numbers)}"


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# ---- attach_to_lab: pure -------------------------------------------------------------------------


def test_user_backend_becomes_tap_and_device_is_kept() -> None:
    argv = [
        QEMU,
        "-enable-kvm",
        "-netdev",
        "user,id=n0,hostfwd=tcp::2222-:22,net=10.9.0.0/24",
        "-device",
        "virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x3,mac=52:54:00:aa:bb:01",
        "-name",
        "db",
    ]
    used: set[str] = set()
    out, plans = attach_to_lab(argv, counter(), used)
    assert out == [
        QEMU,
        "-enable-kvm",
        "-netdev",
        TAP_FORM,
        "-device",
        "virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x3,mac=52:54:00:aa:bb:01",
        "-name",
        "db",
    ]
    assert "hostfwd" not in " ".join(out)
    assert plans == [NicPlan("n0", "tap0", "52:54:00:aa:bb:01", "52:54:00:aa:bb:01", False)]
    assert used == {"52:54:00:aa:bb:01"}


@pytest.mark.parametrize(
    "backend",
    [
        "bridge,id=n0,br=virbr0,helper=/usr/lib/qemu/qemu-bridge-helper",
        "tap,id=n0,ifname=vnet7,script=/etc/qemu-ifup,vhost=on,vhostfd=25,queues=4",
        "tap,fds=23:24,id=n0,vhostfds=25:26",
        "vhost-user,id=n0,chardev=char0,queues=2",
        "socket,id=n0,connect=192.0.2.10:1234",
        "type=user,id=n0,restrict=off",
    ],
)
def test_every_backend_type_becomes_a_plain_tap(backend: str) -> None:
    out, plans = attach_to_lab(["-netdev", backend, "-device", "e1000,netdev=n0"], counter(), set())
    assert out[:2] == ["-netdev", TAP_FORM]
    assert [p.tap for p in plans] == ["tap0"]


def test_mac_used_by_another_lab_vm_is_replaced() -> None:
    used = {"52:54:00:AA:BB:01"}  # case does not matter
    argv = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01,addr=0x3"]
    out, [plan] = attach_to_lab(argv, counter(), used)
    assert plan.mac_changed and plan.original_mac == "52:54:00:aa:bb:01"
    assert LAB_MAC.fullmatch(plan.mac) and plan.mac != "52:54:00:aa:bb:01"
    assert values(out, "-device") == [f"virtio-net-pci,netdev=n0,addr=0x3,mac={plan.mac}"]
    assert plan.mac in used


def test_nics_without_mac_get_unique_macs_across_vms() -> None:
    used: set[str] = set()
    argv = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    first, [a] = attach_to_lab(argv, counter(), used)
    second, [b] = attach_to_lab(argv, counter(), used)
    assert a.original_mac is None and a.mac_changed and b.mac_changed
    assert LAB_MAC.fullmatch(a.mac) and LAB_MAC.fullmatch(b.mac) and a.mac != b.mac
    assert values(first, "-device") == [f"virtio-net-pci,netdev=n0,mac={a.mac}"]
    assert values(second, "-device") == [f"virtio-net-pci,netdev=n0,mac={b.mac}"]
    assert used == {a.mac, b.mac}


def test_two_nics_in_order_and_device_before_its_netdev() -> None:
    argv = [
        "-device",
        "e1000,netdev=lan,mac=52:54:00:00:00:02",  # QEMU accepts the NIC before its backend
        "-netdev",
        "user,id=wan",
        "-device",
        "virtio-net-pci,netdev=wan,mac=52:54:00:00:00:01",
        "-netdev",
        "user,id=lan",
    ]
    out, plans = attach_to_lab(argv, counter(), set())
    assert [(p.netdev_id, p.tap, p.mac, p.mac_changed) for p in plans] == [
        ("wan", "tap0", "52:54:00:00:00:01", False),
        ("lan", "tap1", "52:54:00:00:00:02", False),
    ]
    assert values(out, "-device") == [
        "e1000,netdev=lan,mac=52:54:00:00:00:02",
        "virtio-net-pci,netdev=wan,mac=52:54:00:00:00:01",
    ]
    assert values(out, "-netdev") == [
        "tap,id=wan,ifname=tap0,script=no,downscript=no",
        "tap,id=lan,ifname=tap1,script=no,downscript=no",
    ]


def test_duplicate_mac_inside_one_command_line_is_fixed() -> None:
    argv = [
        "-netdev", "user,id=a", "-device", "e1000,netdev=a,mac=52:54:00:00:00:07",
        "-netdev", "user,id=b", "-device", "e1000,netdev=b,mac=52:54:00:00:00:07",
    ]  # fmt: skip
    _, plans = attach_to_lab(argv, counter(), set())
    assert [p.mac_changed for p in plans] == [False, True]
    assert plans[0].mac != plans[1].mac


def test_nic_option_keeps_model_and_mac_only() -> None:
    argv = ["-nic", "user,model=virtio-net-pci,mac=52:54:00:00:00:09,hostfwd=tcp::80-:80", "-nic", "bridge,br=virbr0"]
    out, plans = attach_to_lab(argv, counter(), set())
    assert out[1] == "tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:00:00:09"
    assert out[3] == f"tap,ifname=tap1,script=no,downscript=no,mac={plans[1].mac}"
    assert [(p.netdev_id, p.original_mac, p.mac_changed) for p in plans] == [
        (None, "52:54:00:00:00:09", False),
        (None, None, True),
    ]


def test_nic_none_is_left_alone() -> None:
    def no_tap() -> str:
        raise AssertionError("a VM without network needs no tap")

    argv = [QEMU, "-nic", "none", "-m", "512"]
    assert attach_to_lab(argv, no_tap, set()) == (argv, [])


def test_default_nic_becomes_a_tap_unless_nodefaults() -> None:
    out, [plan] = attach_to_lab([QEMU, "-m", "512"], counter(), set())
    assert out == [QEMU, "-m", "512", "-nic", f"tap,ifname=tap0,script=no,downscript=no,mac={plan.mac}"]
    assert attach_to_lab([QEMU, "-nodefaults"], counter(), set()) == ([QEMU, "-nodefaults"], [])


@pytest.mark.parametrize("legacy", ["nic,model=e1000", "user,hostfwd=tcp::2222-:22"])
def test_legacy_net_is_refused(legacy: str) -> None:
    with pytest.raises(InvalidArgument, match="legacy -net option"):
        attach_to_lab([QEMU, "-net", legacy], counter(), set())


def test_escaped_commas_stay_inside_their_value() -> None:
    argv = [
        "-netdev",
        "user,id=n0,smb=/srv/a,,b,hostfwd=tcp::1-:1",
        "-device",
        # ',,mac=' is part of the romfile path, not a mac option
        "virtio-net-pci,netdev=n0,romfile=/opt/x,,mac=52:54:00:de:ad:00.rom,addr=0x4",
    ]
    out, [plan] = attach_to_lab(argv, counter(), set())
    assert out[1] == TAP_FORM
    assert plan.original_mac is None and plan.mac != "52:54:00:de:ad:00"
    assert out[3] == f"virtio-net-pci,netdev=n0,romfile=/opt/x,,mac=52:54:00:de:ad:00.rom,addr=0x4,mac={plan.mac}"


def test_json_netdev_and_device() -> None:
    argv = [
        "-netdev",
        '{"type": "user", "id": "n0", "hostfwd": [{"str": "tcp::2222-:22"}]}',
        "-device",
        '{"driver": "virtio-net-pci", "netdev": "n0", "addr": "0x3", "mac": "52:54:00:00:00:05"}',
    ]
    out, [plan] = attach_to_lab(argv, counter(), set())
    assert json.loads(out[1]) == {"type": "tap", "id": "n0", "ifname": "tap0", "script": "no", "downscript": "no"}
    assert json.loads(out[3]) == {"driver": "virtio-net-pci", "netdev": "n0", "addr": "0x3", "mac": "52:54:00:00:00:05"}
    assert not plan.mac_changed


def test_netdev_without_id_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="without id"):
        attach_to_lab(["-netdev", "user"], counter(), set())


def test_namespace_for() -> None:
    assert namespace_for("nightly-1") == NAMESPACE_PREFIX + "nightly-1"
    for bad in ["", "Nightly", "a/b", "a b", "-x", "x" * 33]:
        with pytest.raises(InvalidArgument):
            namespace_for(bad)


# ---- real namespaces -----------------------------------------------------------------------------

root_only = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2: network namespaces"
)


def unique_namespace() -> str:
    return NAMESPACE_PREFIX + "t" + secrets.token_hex(4)


def ip_json(namespace: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", namespace, "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


@pytest.fixture
def lab() -> Iterator[LabNetwork]:
    namespace = unique_namespace()
    try:
        yield LabNetwork.create(namespace, ["10.213.0.2/24"])
    finally:
        LabNetwork.destroy_namespace(namespace)
    assert not LabNetwork.exists(namespace)


@pytest.mark.root
@root_only
def test_create_gives_a_bridge_with_the_address_and_nothing_else(lab: LabNetwork) -> None:
    links = {link["ifname"]: link for link in ip_json(lab.namespace, "link", "show")}
    assert set(links) == {"lo", BRIDGE}  # no veth, no uplink
    assert "UP" in links["lo"]["flags"] and "UP" in links[BRIDGE]["flags"]
    [bridge] = ip_json(lab.namespace, "addr", "show", "dev", BRIDGE)
    assert [(a["local"], a["prefixlen"]) for a in bridge["addr_info"] if a["family"] == "inet"] == [("10.213.0.2", 24)]
    routes = ip_json(lab.namespace, "route", "show")
    assert [r["dst"] for r in routes] == ["10.213.0.0/24"]  # no default route
    assert lab.namespace in list_lab_namespaces()
    assert LabNetwork.exists(lab.namespace)


@pytest.mark.root
@root_only
def test_taps_join_the_bridge_which_keeps_its_mac(lab: LabNetwork) -> None:
    [before] = ip_json(lab.namespace, "link", "show", BRIDGE)
    assert [lab.add_tap(), lab.add_tap()] == ["tap0", "tap1"]
    ports = ip_json(lab.namespace, "link", "show", "master", BRIDGE)
    assert sorted(p["ifname"] for p in ports) == ["tap0", "tap1"]
    assert all("UP" in p["flags"] for p in ports)
    [after] = ip_json(lab.namespace, "link", "show", BRIDGE)
    assert after["address"] == before["address"]
    [tap] = ip_json(lab.namespace, "-d", "link", "show", "tap0")
    assert tap["linkinfo"]["info_data"]["type"] == "tap"


@pytest.mark.root
@root_only
def test_creating_an_existing_namespace_fails_and_leaves_it(lab: LabNetwork) -> None:
    lab.add_tap()
    with pytest.raises(TargetError, match="exists already"):
        LabNetwork.create(lab.namespace, ["10.99.0.1/24"])
    assert LabNetwork.exists(lab.namespace)
    assert {link["ifname"] for link in ip_json(lab.namespace, "link", "show")} == {"lo", BRIDGE, "tap0"}


@pytest.mark.root
@root_only
def test_destroy_removes_the_namespace_and_may_be_repeated() -> None:
    namespace = unique_namespace()
    try:
        network = LabNetwork.create(namespace, [])
        network.add_tap()
        assert namespace in list_lab_namespaces()
        network.destroy()
        assert not LabNetwork.exists(namespace)
        assert namespace not in list_lab_namespaces()
        network.destroy()
    finally:
        LabNetwork.destroy_namespace(namespace)


@pytest.mark.root
@root_only
def test_failure_part_way_removes_the_new_namespace() -> None:
    namespace = unique_namespace()
    try:
        with pytest.raises(TargetError, match="cannot add address 10.213.0.2/24: .*already"):
            LabNetwork.create(namespace, ["10.213.0.2/24", "10.213.0.2/24"])  # ip refuses the second
        assert not LabNetwork.exists(namespace)
    finally:
        LabNetwork.destroy_namespace(namespace)


@pytest.mark.root
@root_only
def test_network_none_has_taps_but_no_bridge() -> None:
    namespace = unique_namespace()
    try:
        network = LabNetwork.create(namespace, [], isolated=False)
        assert network.add_tap() == "tap0"
        links = {link["ifname"]: link for link in ip_json(namespace, "link", "show")}
        assert set(links) == {"lo", "tap0"} and "master" not in links["tap0"]
    finally:
        LabNetwork.destroy_namespace(namespace)


CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError as e:
    print("failed:", e)
    sys.exit(1)
print("connected")
"""


def host_addresses() -> list[str]:
    addresses = ["127.0.0.1"]
    out = subprocess.run(["ip", "-j", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout
    prefsrc = json.loads(out or "[{}]")[0].get("prefsrc")
    if prefsrc:
        addresses.append(prefsrc)
    return addresses


@pytest.mark.root
@root_only
@pytest.mark.parametrize("address", host_addresses())
def test_nothing_in_the_namespace_reaches_the_host(lab: LabNetwork, address: str) -> None:
    with socket.create_server((address, 0)) as server:
        port = str(server.getsockname()[1])
        from_host = subprocess.run([sys.executable, "-c", CONNECT, address, port], capture_output=True, text=True)
        assert from_host.returncode == 0, from_host.stdout + from_host.stderr  # the control: the listener works
        inside = [*lab.command_prefix(), sys.executable, "-c", CONNECT, address, port]
        from_lab = subprocess.run(inside, capture_output=True, text=True, timeout=20)
        assert from_lab.returncode == 1 and "failed:" in from_lab.stdout, from_lab.stdout + from_lab.stderr


@pytest.mark.root
@root_only
@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU}")
def test_qemu_opens_the_pre_created_tap(lab: LabNetwork, tmp_path: Path) -> None:
    qmp = tmp_path / "qmp.sock"
    saved = [
        QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-netdev", "user,id=n0,hostfwd=tcp::2222-:22",
        "-device", "virtio-net-pci,netdev=n0,addr=0x5",
    ]  # fmt: skip
    argv, [plan] = attach_to_lab(saved, lab.add_tap, set())
    assert "NO-CARRIER" in ip_json(lab.namespace, "link", "show", plan.tap)[0]["flags"]
    qemu = subprocess.Popen([*lab.command_prefix(), *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while qemu.poll() is None and time.monotonic() < deadline:
            if "LOWER_UP" in ip_json(lab.namespace, "link", "show", plan.tap)[0]["flags"] and qmp.exists():
                break
            time.sleep(0.1)
        assert qemu.poll() is None, qemu.communicate()[1]
        assert "LOWER_UP" in ip_json(lab.namespace, "link", "show", plan.tap)[0]["flags"]  # QEMU holds the tap
        with QmpConnection(str(qmp)) as monitor:
            info = monitor.execute("human-monitor-command", **{"command-line": "info network"})
        assert f"macaddr={plan.mac}" in info
        assert f"ifname={plan.tap},script=no,downscript=no" in info
    finally:
        qemu.kill()
        _, stderr = qemu.communicate(timeout=10)
    assert not re.search(r"error|could not|failed", stderr, re.I), stderr
