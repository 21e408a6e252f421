"""Is a database server ready for clients, or only listening? A first exchange in its own protocol.

A TCP connect is not enough to call a restored service ready: PostgreSQL accepts connections while
it replays its WAL after a crash-consistent or application-consistent restore, and answers each of
them "the database system is not yet accepting connections" (SQLSTATE 57P03) until recovery is
done. So the lab asks the way `pg_isready` and `mariadb-admin ping` do, without logging in:

  postgresql  send a StartupMessage (protocol 3.0); any answer but 57P03 means the server takes
              clients: an authentication request, or an error such as a refused user or a missing
              database (the server judged the login, so it is up);
  mysql       MySQL and MariaDB greet first: a handshake (protocol 10) or an error packet that is
              not "server shutdown in progress" means the server takes clients;
  tcp         a connect that succeeds is all there is to know.

`protocol_for_port` picks a protocol from the well-known port when the operator names none. Only the
standard library is used: this runs in the lab's probe child (surepoint.lab.probe).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

PROTOCOLS = ("tcp", "postgresql", "mysql")
WELL_KNOWN = {5432: "postgresql", 3306: "mysql"}
PG_NOT_YET = "57P03"  # cannot_connect_now: starting up, in recovery, shutting down
MYSQL_SHUTTING_DOWN = (1053,)  # ER_SERVER_SHUTDOWN
MAX_MESSAGE = 1 << 16  # a greeting longer than this is not one we understand


@dataclass(frozen=True)
class Greeting:
    """ready: the server takes clients; detail: what it said, one line, for the lab's report."""

    ready: bool
    detail: str


def protocol_for_port(port: int) -> str:
    return WELL_KNOWN.get(port, "tcp")


def greet(sock: socket.socket, protocol: str) -> Greeting:
    """The first exchange with a connected server. A server that closes or says nothing is not ready."""
    if protocol == "tcp":
        return Greeting(True, "accepts TCP connections")
    if protocol == "postgresql":
        return _postgresql(sock)
    if protocol == "mysql":
        return _mysql(sock)
    raise ValueError(f"unknown protocol {protocol!r}")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError(f"the server closed the connection after {len(data)} of {size} bytes")
        data += part
    return data


def _printable(text: str, limit: int = 200) -> str:
    """A server's message as one line of plain characters (it is guest data)."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))[:limit]


def _postgresql(sock: socket.socket) -> Greeting:
    params = b"user\0postgres\0database\0postgres\0application_name\0surepoint-lab-probe\0\0"
    sock.sendall(struct.pack("!II", 8 + len(params), 3 << 16) + params)
    kind = _recv_exactly(sock, 1)
    (length,) = struct.unpack("!I", _recv_exactly(sock, 4))
    if not 4 <= length <= MAX_MESSAGE:
        return Greeting(False, f"PostgreSQL: a message of {length} bytes is not a server's answer")
    body = _recv_exactly(sock, length - 4)
    if kind in (b"R", b"v"):  # an authentication request, or protocol negotiation
        return Greeting(True, "PostgreSQL accepts connections")
    if kind != b"E":
        return Greeting(False, f"PostgreSQL: unexpected first message {kind!r}")
    fields = {}
    for item in body.split(b"\0"):
        if item:
            fields[chr(item[0])] = item[1:].decode("utf-8", "replace")
    code, message = fields.get("C", "?"), _printable(fields.get("M", ""))
    if code == PG_NOT_YET:
        return Greeting(False, f"PostgreSQL is not yet accepting connections ({code}: {message})")
    return Greeting(True, f"PostgreSQL accepts connections (it answered a probe login with {code}: {message})")


def _mysql(sock: socket.socket) -> Greeting:
    header = _recv_exactly(sock, 4)
    length = int.from_bytes(header[:3], "little")
    if not 1 <= length <= MAX_MESSAGE:
        return Greeting(False, f"MySQL/MariaDB: a packet of {length} bytes is not a greeting")
    payload = _recv_exactly(sock, length)
    if payload[0] == 10:
        version = payload[1:].split(b"\0", 1)[0].decode("ascii", "replace")
        return Greeting(True, f"MySQL/MariaDB {_printable(version, 60)} accepts connections")
    if payload[0] == 0xFF and len(payload) >= 3:
        code = int.from_bytes(payload[1:3], "little")
        rest = payload[3:]
        if rest[:1] == b"#":  # a SQLSTATE marker and five characters come before the message
            rest = rest[6:]
        message = _printable(rest.decode("utf-8", "replace"))
        return Greeting(code not in MYSQL_SHUTTING_DOWN, f"MySQL/MariaDB answered error {code}: {message}")
    return Greeting(False, f"MySQL/MariaDB: unexpected greeting (first byte {payload[0]})")
