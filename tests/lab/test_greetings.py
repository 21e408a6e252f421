"""Is a database ready for clients, or only listening? The lab's readiness probe against real servers.

`lab open --expose` opens its door only once the service takes clients. A PostgreSQL still in
recovery accepts TCP connections and refuses every login ("not yet accepting connections"); the
probe must not call that ready. A standby with hot_standby off is exactly such a server, for as long
as we like, and promoting it makes it ready: the real thing, no fake. Protocol corner cases that a
real server will not show on demand (MariaDB shutting down, a server closing at once) use small
scripted servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from surepoint.lab.greetings import greet, protocol_for_port
from surepoint.lab.probe import probe_tcp

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standby() -> Iterator[tuple[int, Callable[[], None]]]:
    """A real PostgreSQL standby with hot_standby off: listening, not taking clients. Yields (port, promote)."""
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists():
        pytest.skip("needs root and PostgreSQL 15 (scripts/setup-databases)")
    top = Path(tempfile.mkdtemp(prefix="spg-", dir="/tmp"))
    os.chmod(top, 0o755)
    data, port = top / "data", free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    shutil.chown(top, "postgres")
    subprocess.run([*as_pg, PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
                    "--no-instructions"], check=True, capture_output=True, timeout=120)  # fmt: skip
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{top}'\n")
        conf.write("hot_standby = off\n")
    (data / "standby.signal").touch()
    shutil.chown(data / "standby.signal", "postgres")
    pg_ctl = [*as_pg, PG_BIN / "pg_ctl", "-D", data, "-l", top / "log", "-t", "120"]
    subprocess.run([*pg_ctl, "-w", "start"], check=True, capture_output=True, timeout=150)
    try:
        yield port, lambda: subprocess.run([*pg_ctl, "-w", "promote"], check=True, capture_output=True, timeout=150)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=90)
        shutil.rmtree(top, ignore_errors=True)


def test_a_postgresql_that_refuses_logins_is_not_ready_until_promoted(standby) -> None:
    port, promote = standby
    assert probe_tcp("127.0.0.1", port, 3).ok  # it listens: a plain connect cannot tell
    waiting = probe_tcp("127.0.0.1", port, 3, "postgresql")
    assert not waiting.ok and "57P03" in waiting.detail and "not yet accepting" in waiting.detail, waiting
    assert waiting.seconds >= 2.5  # it kept asking until its timeout
    promote()
    ready = probe_tcp("127.0.0.1", port, 30, "postgresql")
    assert ready.ok and "PostgreSQL accepts connections" in ready.detail, ready


def test_probe_waits_for_a_postgresql_that_becomes_ready(standby) -> None:
    port, promote = standby
    timer = threading.Timer(3.0, promote)
    timer.start()
    try:
        ready = probe_tcp("127.0.0.1", port, 60, "postgresql")
    finally:
        timer.join()
    assert ready.ok and ready.seconds >= 2.5, ready


# -- scripted servers for what real ones will not do on demand -----------------------------------


@contextlib.contextmanager
def scripted(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A server on 127.0.0.1 that runs `answer` on every connection; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def mysql_packet(payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + b"\0" + payload


def mysql_error(code: int, message: str) -> bytes:
    return mysql_packet(b"\xff" + code.to_bytes(2, "little") + b"#HY000" + message.encode())


def pg_error(code: str, message: str) -> bytes:
    body = b"SFATAL\0C" + code.encode() + b"\0M" + message.encode() + b"\0\0"
    return b"E" + struct.pack("!I", 4 + len(body)) + body


@pytest.mark.parametrize(
    ("greeting", "ready", "says"),
    [
        (mysql_packet(b"\x0a10.11.6-MariaDB\0" + b"\0" * 40), True, "MariaDB 10.11.6-MariaDB accepts"),
        (mysql_error(1040, "Too many connections"), True, "error 1040: Too many connections"),
        (mysql_error(1053, "Server shutdown in progress"), False, "error 1053"),
        (mysql_packet(b"\x09old"), False, "unexpected greeting"),
        (mysql_error(1130, "Host '\x1b[31mx' is not allowed"), True, "Host '?[31mx'"),  # guest text, made printable
    ],
)
def test_mysql_greetings(greeting: bytes, ready: bool, says: str) -> None:
    with scripted(lambda conn: conn.sendall(greeting)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        got = greet(sock, "mysql")
    assert got.ready is ready and says in got.detail, got


@pytest.mark.parametrize(
    ("answer", "ready", "says"),
    [
        (b"R" + struct.pack("!II", 8, 5) + b"salt", True, "accepts connections"),
        (pg_error("28000", 'no pg_hba.conf entry for host "10.0.2.254"'), True, "28000"),
        (pg_error("3D000", 'database "postgres" does not exist'), True, "3D000"),
        (pg_error("57P03", "the database system is starting up"), False, "starting up"),
        (b"Z" + struct.pack("!I", 5) + b"I", False, "unexpected first message"),
        (b"E" + struct.pack("!I", 1 << 30), False, "not a server's answer"),
    ],
)
def test_postgresql_answers(answer: bytes, ready: bool, says: str) -> None:
    def server(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(answer)

    with scripted(server) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        got = greet(sock, "postgresql")
    assert got.ready is ready and says in got.detail, got


def test_a_server_that_hangs_up_or_stays_silent_is_not_ready() -> None:
    with scripted(lambda conn: None) as port:
        closing = probe_tcp("127.0.0.1", port, 2, "mysql")
    assert not closing.ok and "closed the connection" in closing.detail, closing
    with scripted(lambda conn: time.sleep(3)) as port:
        silent = probe_tcp("127.0.0.1", port, 2, "postgresql")
    assert not silent.ok and "no answer" in silent.detail, silent


def test_protocol_by_well_known_port() -> None:
    assert (protocol_for_port(5432), protocol_for_port(3306), protocol_for_port(389)) == ("postgresql", "mysql", "tcp")
