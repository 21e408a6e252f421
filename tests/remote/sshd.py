"""A real OpenSSH server on 127.0.0.1 for ssh:// repository tests (session fixture `sshd`).

The `full` key logs in without a forced command (the client names the path and runs `surepoint
serve PATH`, found through SUREPOINT_REMOTE_PATH). `append_only_client(path)` makes a new key bound
to `surepoint serve --append-only PATH` by its authorized_keys line, as in docs/offsite.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SUREPOINT = shutil.which("surepoint") or os.path.join(os.path.dirname(sys.executable), "surepoint")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SshServer:
    port: int
    home: Path
    full_key: Path
    known_hosts: Path

    def url(self, path: os.PathLike | str) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{os.path.abspath(path)}"

    def append_only_client(self, path: os.PathLike | str) -> dict[str, str]:
        """A new key whose authorized_keys line serves `path` append-only; its client environment."""
        key = self.home / f"append_only_{os.urandom(4).hex()}"
        public = _keygen(key)
        with open(self.home / "authorized_keys", "a") as f:
            f.write(f'command="{SUREPOINT} serve --append-only {os.path.abspath(path)}",restrict {public}\n')
        return self.env(key)

    def env(self, identity: Path | None = None) -> dict[str, str]:
        """Client environment: which key, our known_hosts, no user ssh config."""
        identity = identity or self.full_key
        command = (
            f"ssh -F /dev/null -i {identity} -o IdentitiesOnly=yes -o UserKnownHostsFile={self.known_hosts} "
            "-o StrictHostKeyChecking=yes -o LogLevel=ERROR "
            # one connection per key, shared by the sessions of the tests: no handshake each time
            f"-o ControlMaster=auto -o ControlPath={self.home}/cm-{identity.name}-%r -o ControlPersist=30"
        )
        return {"SUREPOINT_SSH_COMMAND": command, "SUREPOINT_REMOTE_PATH": SUREPOINT}


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_sshd(home: Path):
    """Start sshd in `home`; return (server, process). Skips when sshd or root is missing."""
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed (scripts/setup test installs it)")
    if os.geteuid() != 0:
        pytest.skip("the sshd fixture logs in as root")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    home.mkdir(parents=True, exist_ok=True)
    host_pub = _keygen(home / "host_key")
    full_pub = _keygen(home / "full_key")
    authorized = home / "authorized_keys"
    authorized.write_text(f"restrict {full_pub}\n")
    authorized.chmod(0o600)
    for _attempt in range(5):
        port = _free_port()
        config = home / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
            f"AuthorizedKeysFile {authorized}\nPidFile {home / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPermitUserEnvironment no\nLogLevel ERROR\nMaxSessions 50\nMaxStartups 50\n"
        )
        log = open(home / "sshd.log", "ab")  # noqa: SIM115 - kept open for the server's life
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        log.close()
        if _wait_listening(port, proc):
            known = home / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
            server = SshServer(port, home, home / "full_key", known)
            return server, proc
        proc.kill()
        proc.wait()
    raise RuntimeError(f"sshd did not start: {(home / 'sshd.log').read_text()}")


def stop_sshd(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """One OpenSSH server for the whole test session."""
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    for socket_path in server.home.glob("cm-*"):  # the shared connections end with the server
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "127.0.0.1"], capture_output=True)
    stop_sshd(proc)
