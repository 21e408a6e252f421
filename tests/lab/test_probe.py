"""Lab network probes in a throwaway network namespace, and the lab's test specifications.

The probes run as `ip netns exec NS python -m surepoint.lab.probe ...`, exactly as the lab runs them:
a loopback-only namespace answers its own ICMP and TCP, reaches nothing else, and in particular not
a listener on the host's loopback (the isolation the lab relies on).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from surepoint.errors import ConfigError
from surepoint.lab.check_spec import CheckSpec, parse_check
from surepoint.lab.checks import CheckContext, run_check
from surepoint.lab.probe import run_probe


def needs_root(test):
    """Namespaces and raw sockets need root."""
    return pytest.mark.root(pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")(test))


LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    s.accept()[0].close()
"""


@pytest.fixture()
def netns() -> Iterator[str]:
    """A new network namespace with only loopback, up; deleted afterwards whatever happened."""
    name = f"surepoint-lab-p{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def prefix(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


@pytest.fixture()
def listener_in(netns: str) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 inside the namespace; its port."""
    proc = subprocess.Popen([*prefix(netns), sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture()
def host_listener() -> Iterator[int]:
    """A TCP listener on the host's 127.0.0.1 (this test's own network namespace); its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- probes ---------------------------------------------------------------------------------------


@needs_root
def test_icmp_inside_the_namespace(netns: str) -> None:
    result = run_probe(prefix(netns), "icmp", ["127.0.0.1", "--count", "2"], timeout=10)
    assert result.ok, result.detail
    assert "2 echo replies from 127.0.0.1" in result.detail
    assert result.seconds < 5


@needs_root
def test_icmp_to_an_unroutable_address_fails_within_its_timeout(netns: str) -> None:
    started = time.monotonic()
    result = run_probe(prefix(netns), "icmp", ["10.255.255.1"], timeout=3)
    took = time.monotonic() - started
    assert not result.ok
    assert "0 of 1 echo replies from 10.255.255.1 within 3 s" in result.detail
    assert "unreachable" in result.detail.lower()  # the namespace has no route at all
    assert 2.5 <= result.seconds <= 4
    assert took < 8


@needs_root
def test_tcp_to_a_listener_inside_the_namespace(netns: str, listener_in: int) -> None:
    result = run_probe(prefix(netns), "tcp", ["127.0.0.1", str(listener_in)], timeout=10)
    assert result.ok, result.detail
    assert f"connected to 127.0.0.1:{listener_in}" in result.detail


@needs_root
def test_tcp_to_a_closed_port_fails_after_retrying(netns: str) -> None:
    port = closed_port()
    result = run_probe(prefix(netns), "tcp", ["127.0.0.1", str(port)], timeout=2.5)
    assert not result.ok
    assert "Connection refused" in result.detail
    attempts = int(re.search(r"\((\d+) attempts", result.detail).group(1))
    assert attempts >= 3  # it kept trying, once a second, until its timeout
    assert 2.0 <= result.seconds <= 4


@needs_root
def test_the_hosts_loopback_is_not_reachable_from_the_namespace(netns: str, host_listener: int) -> None:
    from_host = run_probe([], "tcp", ["127.0.0.1", str(host_listener)], timeout=5)
    assert from_host.ok, from_host.detail  # control: the listener is there
    from_lab = run_probe(prefix(netns), "tcp", ["127.0.0.1", str(host_listener)], timeout=2)
    assert not from_lab.ok
    assert "Connection refused" in from_lab.detail


def test_a_broken_probe_is_a_result_not_an_exception() -> None:
    result = run_probe(["ip", "netns", "exec", "surepoint-lab-no-such-ns"], "tcp", ["127.0.0.1", "1"], timeout=2)
    assert not result.ok
    assert "surepoint-lab-no-such-ns" in result.detail


# -- checks through the namespace -----------------------------------------------------------------


def context(ns: str | None, addresses: list[str] | None = None, **kw) -> CheckContext:
    return CheckContext(
        vm="web1", guest_agent=None, network_prefix=prefix(ns) if ns else None, addresses=addresses or [], **kw
    )


@needs_root
def test_port_check_uses_the_vms_address(netns: str, listener_in: int) -> None:
    spec = parse_check({"type": "port", "port": listener_in, "timeout": 10}, "t")
    result = run_check(spec, context(netns, ["127.0.0.1"]))
    assert (result.outcome, result.name) == ("passed", f"port {listener_in}"), result.output
    closed = parse_check({"type": "port", "port": closed_port(), "timeout": 2}, "t")
    result = run_check(closed, context(netns, ["127.0.0.1"]))
    assert result.outcome == "failed"
    assert "Connection refused" in result.output


@needs_root
def test_lab_script_runs_inside_the_namespace_with_the_vm_in_its_environment(netns: str) -> None:
    code = (
        "import os, socket; print(os.environ['SUREPOINT_LAB_VM'], os.environ['SUREPOINT_LAB_ADDRESS']);"
        "print(os.readlink('/proc/self/ns/net')); print(sorted(n for _, n in socket.if_nameindex()))"
    )
    spec = parse_check({"type": "script", "where": "lab", "argv": [sys.executable, "-c", code]}, "t")
    result = run_check(spec, context(netns, ["192.0.2.10"]))
    assert result.outcome == "passed", result.output
    assert "web1 192.0.2.10" in result.output
    assert "['lo']" in result.output  # only the namespace's loopback, none of the host's interfaces
    assert os.readlink("/proc/self/ns/net") not in result.output
    failing = parse_check({"type": "script", "where": "lab", "argv": ["sh", "-c", "echo no >&2; exit 4"]}, "t")
    result = run_check(failing, context(netns))
    assert result.outcome == "failed"
    assert result.output.startswith("exit code 4 (expected 0)")
    assert "no" in result.output


@needs_root
def test_lab_script_past_its_timeout_is_killed(netns: str) -> None:
    spec = parse_check({"type": "script", "where": "lab", "argv": ["sleep", "30"], "timeout": 1.5}, "t")
    started = time.monotonic()
    result = run_check(spec, context(netns))
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 5


def test_network_checks_without_network_or_address_are_errors() -> None:
    ping = parse_check({"type": "ping"}, "t")
    result = run_check(ping, context(None, ["192.0.2.10"]))
    assert result.outcome == "error"
    assert "the lab has no network" in result.output
    result = run_check(ping, CheckContext("web1", None, ["ip", "netns", "exec", "x"], []))
    assert result.outcome == "error"
    assert "no address known for web1" in result.output


def test_guest_checks_without_an_agent_are_errors(tmp_path) -> None:
    spec = parse_check({"type": "sqlite", "path": "/srv/app.db"}, "t")
    result = run_check(spec, CheckContext("web1", str(tmp_path / "qga.sock"), None, []))
    assert result.outcome == "error"
    assert "qga.sock" in result.output
    heartbeat = parse_check({"type": "heartbeat", "timeout": 2}, "t")
    started = time.monotonic()
    result = run_check(heartbeat, CheckContext("web1", str(tmp_path / "qga.sock"), None, []))
    assert result.outcome == "failed"
    assert "did not answer within 2 s" in result.output
    assert time.monotonic() - started < 4


def test_a_check_never_runs_past_the_labs_deadline() -> None:
    spec = parse_check({"type": "heartbeat"}, "t")
    result = run_check(spec, CheckContext("web1", "/nonexistent", None, [], deadline=time.monotonic() - 1))
    assert result.outcome == "timeout"
    assert result.to_dict() == {
        "name": "heartbeat",
        "type": "heartbeat",
        "outcome": "timeout",
        "output": result.output,
        "seconds": 0.0,
    }


# -- parse_check -----------------------------------------------------------------------------------


def test_parse_check_fills_in_defaults() -> None:
    assert parse_check({"type": "postgresql", "database": "app"}, "t") == CheckSpec(
        "postgresql",
        "postgresql app",
        300.0,
        {"database": "app", "query": "SELECT 1", "amcheck": True, "user": "postgres"},
    )
    assert parse_check({"type": "port", "port": 5432}, "t") == CheckSpec("port", "port 5432", 120.0, {"port": 5432})
    spec = parse_check({"type": "script", "argv": ["/usr/local/bin/smoke", "-v"], "name": "smoke", "timeout": 5}, "t")
    assert spec == CheckSpec(
        "script", "smoke", 5.0, {"argv": ["/usr/local/bin/smoke", "-v"], "where": "guest", "expect_exit": 0}
    )
    assert parse_check({"type": "heartbeat"}, "t").timeout == 60.0


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"type": "telnet"}, "unknown test type 'telnet'"),
        ({"port": 22}, "`type` is missing"),
        ({"type": "port", "port": 22, "adress": "10.0.0.1"}, "unknown setting(s) adress for a port test"),
        ({"type": "port"}, "`port` is required for a port test"),
        ({"type": "port", "port": "22"}, "`port` must be an integer from 1 to 65535"),
        ({"type": "port", "port": 70000}, "`port` must be an integer from 1 to 65535"),
        ({"type": "port", "port": True}, "`port` must be an integer"),
        ({"type": "ping", "address": "db.example"}, "`address` must be an IP address"),
        ({"type": "postgresql", "amcheck": "yes"}, "`amcheck` must be true or false"),
        ({"type": "mariadb"}, "`database` is required for a mariadb test"),
        ({"type": "mariadb", "database": "app", "tables": "t1"}, "`tables` must be an array of non-empty strings"),
        ({"type": "sqlite", "path": "app.db"}, "`path` must be an absolute path"),
        ({"type": "script", "argv": "echo hi"}, "`argv` must be an array of non-empty strings"),
        ({"type": "script", "argv": []}, "`argv` must not be empty"),
        ({"type": "script", "argv": ["true"], "where": "host"}, '`where` must be "guest"'),
        ({"type": "heartbeat", "timeout": 0}, "`timeout` must be a positive number"),
        ({"type": "heartbeat", "timeout": "60"}, "`timeout` must be a positive number"),
    ],
)
def test_parse_check_errors_name_where(raw: dict, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_check(raw, "group 'db' test 2")
    message = str(err.value)
    assert message.startswith("group 'db' test 2: ")
    assert says in message
    assert "\n" not in message
