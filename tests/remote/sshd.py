"""A real OpenSSH server on 127.0.0.1 for ssh:// repository tests.

Two client keys: `full` logs in without a forced command (the client names the path and runs
`surepoint serve PATH`, found through SUREPOINT_REMOTE_PATH), `append_only` is bound to
`surepoint serve --append-only <append_only_root>` by its authorized_keys line, as in docs/offsite.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SUREPOINT

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SshServer:
    port: int
    home: Path
    full_key: Path
    append_only_key: Path
    append_only_root: Path
    known_hosts: Path

    def url(self, path: os.PathLike | str) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{os.path.abspath(path)}"

    def env(self, key: str = "full") -> dict[str, str]:
        """Client environment: which key, our known_hosts, no user ssh config."""
        identity = self.full_key if key == "full" else self.append_only_key
        command = (
            f"ssh -F /dev/null -i {identity} -o IdentitiesOnly=yes -o UserKnownHostsFile={self.known_hosts} "
            "-o StrictHostKeyChecking=yes -o LogLevel=ERROR"
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
    ao_pub = _keygen(home / "append_only_key")
    ao_root = home / "append-only-repo"
    authorized = home / "authorized_keys"
    authorized.write_text(
        f'restrict {full_pub}\ncommand="{SUREPOINT} serve --append-only {ao_root}",restrict {ao_pub}\n'
    )
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
            server = SshServer(port, home, home / "full_key", home / "append_only_key", ao_root, known)
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
