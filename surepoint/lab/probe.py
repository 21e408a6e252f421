"""Network probes that run inside the lab's network namespace: ICMP echo and TCP connect.

A namespace is entered by a process, not by a thread, so the host runs each probe as a child:
`ip netns exec NS python -m surepoint.lab.probe icmp ADDRESS --timeout S [--count N]` or
`... tcp ADDRESS PORT --timeout S`. The child prints one JSON line {"ok", "detail", "seconds"} and
exits 0 or 1; `run_probe` is the host side. Both probes retry until their timeout, because a VM's
network often comes up after its guest agent answers.

ICMP is sent from a raw socket (we run as root), not by a ping binary the host may lack. This module
imports only the standard library (and surepoint.lab.greetings, which does the same), so the child
starts fast and needs nothing but the package path.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from surepoint.lab.greetings import PROTOCOLS, greet

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `surepoint` package
PROBE_KINDS = ("icmp", "tcp")
SEND_INTERVAL = 1.0  # seconds between echo requests, and between connect attempts
CHILD_GRACE = 5.0  # how much longer than the probe's own timeout the host waits for the child

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 128, 129


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found: ok, a one-line detail for the report, and how long it took."""

    ok: bool
    detail: str
    seconds: float
    timed_out: bool = False  # the probe itself did not finish in time (killed by the host)


# -- ICMP ---------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(v6: bool, ident: int, seq: int) -> bytes:
    payload = b"surepoint-lab-probe"
    kind = ICMP6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:  # the kernel fills in the ICMPv6 checksum (it covers a pseudo-header we do not know)
        return header + payload
    return struct.pack("!BBHHH", kind, 0, _checksum(header + payload), ident, seq) + payload


def _echo_reply_seq(packet: bytes, v6: bool, ident: int) -> int | None:
    """The sequence number of our echo reply in a received packet, or None if it is something else.

    A raw socket sees every ICMP packet of the namespace (on loopback, our own requests too), so
    the type and identifier are both checked. IPv4 raw sockets deliver the IP header, IPv6 not.
    """
    if not v6:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < 8:
        return None
    kind, _code, _sum, got_ident, seq = struct.unpack("!BBHHH", packet[:8])
    if kind != (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY) or got_ident != ident:
        return None
    return seq


def probe_icmp(address: str, timeout: float, count: int = 1) -> ProbeResult:
    """Send an echo request every second until `count` replies came back or the timeout passed."""
    started = time.monotonic()
    deadline = started + timeout
    v6 = ipaddress.ip_address(address).version == 6
    try:
        if v6:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        return ProbeResult(False, "cannot open a raw ICMP socket: needs root (CAP_NET_RAW)", 0.0)
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    rtts: list[float] = []
    last_error = ""
    seq = 0
    with sock:
        while len(rtts) < count:
            now = time.monotonic()
            if now >= deadline:
                break
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(_echo_request(v6, ident, seq), (address, 0))
                sent[seq] = now
            except OSError as exc:  # e.g. network unreachable while the namespace has no route yet
                last_error = exc.strerror or str(exc)
            next_send = min(deadline, now + SEND_INTERVAL)
            while len(rtts) < count:
                left = next_send - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                packet, source = sock.recvfrom(65535)
                got = _echo_reply_seq(packet, v6, ident)
                if got in sent and ipaddress.ip_address(source[0]) == ipaddress.ip_address(address):
                    rtts.append(time.monotonic() - sent.pop(got))
            if len(rtts) < count and time.monotonic() < next_send:
                time.sleep(max(0.0, next_send - time.monotonic()))
    seconds = time.monotonic() - started
    if len(rtts) >= count:
        avg = sum(rtts) / len(rtts) * 1000
        return ProbeResult(
            True, f"{len(rtts)} echo repl{'y' if count == 1 else 'ies'} from {address}, avg rtt {avg:.1f} ms", seconds
        )
    detail = f"{len(rtts)} of {count} echo replies from {address} within {timeout:g} s ({seq} requests sent)"
    if last_error:
        detail += f"; last error: {last_error}"
    return ProbeResult(False, detail, seconds)


# -- TCP ----------------------------------------------------------------------------------------


def probe_tcp(address: str, port: int, timeout: float, protocol: str = "tcp") -> ProbeResult:
    """Connect to address:port, retrying every second until it succeeds or the timeout passed.

    With a protocol other than "tcp", success also needs the server's first answer in that protocol
    to say it takes clients (surepoint.lab.greetings): a database still replaying its log is not ready.
    """
    started = time.monotonic()
    deadline = started + timeout
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    attempts = 0
    last_error = "no attempt"
    while True:
        attempts += 1
        attempt_started = time.monotonic()
        left = deadline - attempt_started
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(5.0, left))) as sock:
                greeting = greet(sock, protocol)
            if greeting.ready:
                said = "" if protocol == "tcp" else f": {greeting.detail}"
                seconds = time.monotonic() - started
                return ProbeResult(True, f"connected to {target} (attempt {attempts}){said}", seconds)
            last_error = greeting.detail
        except TimeoutError:
            last_error = "connect timed out" if protocol == "tcp" else "no answer in time"
        except OSError as exc:
            last_error = exc.strerror or str(exc)
        if time.monotonic() >= deadline - 0.05:
            break
        time.sleep(max(0.0, min(attempt_started + SEND_INTERVAL, deadline) - time.monotonic()))
    return ProbeResult(
        False,
        f"cannot connect to {target} within {timeout:g} s ({attempts} attempts; last error: {last_error})",
        time.monotonic() - started,
    )


# -- host side ----------------------------------------------------------------------------------


def run_probe(prefix: list[str], kind: str, args: list[str], timeout: float) -> ProbeResult:
    """Run a probe as a child process under `prefix` (e.g. ["ip", "netns", "exec", NS], or [] for none).

    `args` are the probe's arguments after its kind, without --timeout (for icmp: ADDRESS and
    optionally "--count", N; for tcp: ADDRESS, PORT and optionally "--protocol", NAME). Never raises
    for a probe that fails or breaks: the ProbeResult says what happened.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}")
    argv = [*prefix, sys.executable, "-m", "surepoint.lab.probe", kind, *args, "--timeout", f"{timeout:g}"]
    env = dict(os.environ)  # `ip netns exec` keeps the environment and the working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + CHILD_GRACE,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(
            False,
            f"the {kind} probe did not finish within {timeout + CHILD_GRACE:g} s",
            time.monotonic() - started,
            True,
        )
    except OSError as exc:
        return ProbeResult(False, f"cannot run the {kind} probe: {exc}", time.monotonic() - started)
    seconds = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1])
        return ProbeResult(bool(answer["ok"]), str(answer["detail"]), float(answer["seconds"]))
    except (IndexError, ValueError, KeyError, TypeError):
        said = " ".join((proc.stderr or proc.stdout).split())[-500:]
        return ProbeResult(False, f"the {kind} probe broke (exit code {proc.returncode}): {said}", seconds)


# -- child side ---------------------------------------------------------------------------------


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surepoint.lab.probe", description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    icmp = kinds.add_parser("icmp", help="ICMP echo until COUNT replies came back")
    icmp.add_argument("address", type=_ip)
    icmp.add_argument("--count", type=int, default=1)
    icmp.add_argument("--timeout", type=float, required=True)
    tcp = kinds.add_parser("tcp", help="TCP connect")
    tcp.add_argument("address", type=_ip)
    tcp.add_argument("port", type=int)
    tcp.add_argument("--protocol", choices=PROTOCOLS, default="tcp", help="ask if the server takes clients")
    tcp.add_argument("--timeout", type=float, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.kind == "icmp":
        result = probe_icmp(args.address, args.timeout, max(1, args.count))
    else:
        result = probe_tcp(args.address, args.port, args.timeout, args.protocol)
    print(json.dumps({"ok": result.ok, "detail": result.detail, "seconds": round(result.seconds, 3)}), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
