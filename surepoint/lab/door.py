"""The one controlled door into an open lab: a port on this host's 127.0.0.1 forwarded to one service in the lab.

`ip netns exec NS python -m surepoint.lab.door --listen-fd N --to ADDRESS:PORT`: the listening
socket is made by the parent in the host's network namespace (127.0.0.1 only) and handed down as
file descriptor N; this process runs inside the lab's namespace, so every connection it opens is
made there, and the only one it ever opens is to ADDRESS:PORT. Nothing in the lab can connect out
through it: it only accepts on the host side. It runs until SIGTERM; it is the open lab's owner
process (surepoint.lab.records: a lab whose owner is gone is torn down by the next lab command).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CONNECT_TIMEOUT = 10.0
BUFFER = 1 << 16


def start_door(prefix: list[str], listener: socket.socket, address: str, port: int, log_path: str) -> subprocess.Popen:
    """Start the door process under `prefix` (`ip netns exec NS`) with `listener` handed down; it outlives us."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    fd = listener.fileno()
    argv = [*prefix, sys.executable, "-m", "surepoint.lab.door", "--listen-fd", str(fd), "--to", f"{address}:{port}"]
    with open(log_path, "ab") as log:
        os.chmod(log_path, 0o600)
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(fd,), start_new_session=True
        )


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(BUFFER):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _serve(client: socket.socket, address: str, port: int) -> None:
    try:
        inside = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        print(f"door: cannot reach {address}:{port} in the lab: {exc}", flush=True)
        client.close()
        return
    inside.settimeout(None)
    back = threading.Thread(target=_pump, args=(inside, client), daemon=True)
    back.start()
    _pump(client, inside)
    back.join()
    client.close()
    inside.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surepoint.lab.door", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--to", required=True, help="ADDRESS:PORT in the lab")
    args = parser.parse_args(argv)
    address, _, port = args.to.rpartition(":")
    listener = socket.socket(fileno=args.listen_fd)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        client, _peer = listener.accept()
        threading.Thread(target=_serve, args=(client, address.strip("[]"), int(port)), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
