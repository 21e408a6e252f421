"""Run writer commands inside a KVM guest through qemu-guest-agent: nothing installed in the guest.

One-shot commands use guest-exec with argument vectors. A session (psql holding a backup open,
mariadb holding a read lock) needs a process fed over time, which guest-exec cannot do; for that
a small /bin/sh relay is written into a private directory in the guest at job time and removed
afterwards. The relay starts the client reading from a FIFO, copies each request file the host
writes into it, and the host reads the client's output file through guest-file-read.
"""

from __future__ import annotations

import secrets
import threading
import time

from surepoint.consistency.runner import CommandFailed, CommandResult
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_WORKDIR = "/run"

# $1 = private directory, the rest = the client's argument vector. No host text is ever pasted
# into this script: names and arguments reach it only as argv.
RELAY = """#!/bin/sh
dir=$1
shift
mkfifo -m 600 "$dir/in" || exit 90
"$@" < "$dir/in" > "$dir/out" 2>&1 &
client=$!
exec 3> "$dir/in"
n=0
while :; do
    if [ -e "$dir/req.$n.ready" ]; then
        cat "$dir/req.$n" >&3
        rm -f "$dir/req.$n" "$dir/req.$n.ready"
        n=$((n + 1))
    elif [ -e "$dir/close" ] || ! kill -0 "$client" 2>/dev/null; then
        break
    else
        sleep 0.05
    fi
done
exec 3>&-
wait "$client"
echo $? > "$dir/exit"
"""


class GuestSession:
    def __init__(self, runner: GuestRunner, argv: list[str], env: dict[str, str] | None) -> None:
        self.runner = runner
        self.argv = argv
        agent = runner.agent
        self.dir = f"{GUEST_WORKDIR}/surepoint-{secrets.token_hex(6)}"
        runner.run(["mkdir", "-m", "700", self.dir], timeout=30).check()
        try:
            with runner.lock:
                agent.write_file(f"{self.dir}/relay.sh", RELAY.encode())
                self.pid = agent.exec_start(
                    ["/bin/sh", f"{self.dir}/relay.sh", self.dir, *argv],
                    env={"PATH": GUEST_PATH, **(env or {})},
                    capture=False,
                )
            self._requests = 0
            self._buffer = b""
            self._out_handle: int | None = None
        except GuestAgentError as exc:
            self._cleanup()
            raise CommandFailed(f"cannot start {argv[0]} in the guest: {exc}") from None

    def _read_output(self) -> None:
        with self.runner.lock:
            if self._out_handle is None:
                try:
                    self._out_handle = self.runner.agent.file_open(f"{self.dir}/out", "r")
                except GuestAgentError:
                    return  # the client has not started yet
            while True:
                data, eof = self.runner.agent.file_read(self._out_handle)
                self._buffer += data
                if eof or not data:
                    return

    def request(self, text: str, marker: str, timeout: float) -> str:
        name = f"{self.dir}/req.{self._requests}"
        try:
            with self.runner.lock:
                self.runner.agent.write_file(name, text.encode())
                self.runner.agent.write_file(name + ".ready", b"")
        except GuestAgentError as exc:
            raise CommandFailed(f"{self.argv[0]} session in the guest: {exc}") from None
        self._requests += 1
        want = marker.encode()
        deadline = time.monotonic() + timeout
        while want not in self._buffer:
            try:
                self._read_output()
            except GuestAgentError as exc:
                raise CommandFailed(f"{self.argv[0]} session in the guest: {exc}") from None
            if want in self._buffer:
                break
            if self._exited():
                self._read_output()
                if want in self._buffer:
                    break
                out = self._buffer.decode(errors="replace").strip().splitlines()
                raise CommandFailed(f"{self.argv[0]} session in the guest ended: {out[-1] if out else ''}")
            if time.monotonic() > deadline:
                raise CommandFailed(f"{self.argv[0]} in the guest did not answer within {timeout:.0f} s")
            time.sleep(0.05)
        before, _, after = self._buffer.partition(want)
        self._buffer = after.lstrip(b"\n")
        return before.decode(errors="replace")

    def _exited(self) -> bool:
        with self.runner.lock:
            return bool(self.runner.agent.exec_status(self.pid).get("exited"))

    def close(self, timeout: float = 10) -> int:
        code = -1
        try:
            with self.runner.lock:
                self.runner.agent.write_file(f"{self.dir}/close", b"")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self.runner.lock:
                    status = self.runner.agent.exec_status(self.pid)
                if status.get("exited"):
                    code = int(status.get("exitcode") or 0)
                    break
                time.sleep(0.1)
        except GuestAgentError:
            pass
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        try:
            with self.runner.lock:
                if getattr(self, "_out_handle", None) is not None:
                    self.runner.agent.file_close(self._out_handle)
                    self._out_handle = None
            self.runner.run(["rm", "-rf", "--", self.dir], timeout=30)
        except (GuestAgentError, CommandFailed):
            pass


class GuestRunner:
    """Runs commands in a guest; `lock` serialises use of the one guest-agent connection."""

    def __init__(self, agent: GuestAgent, vm_name: str = "guest") -> None:
        self.agent = agent
        self.where = f"guest:{vm_name}"
        self.lock = threading.RLock()

    def run(
        self, argv: list[str], *, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
    ) -> CommandResult:
        try:
            with self.lock:
                result = self.agent.exec(
                    argv,
                    input=input.encode() if input is not None else None,
                    env={"PATH": GUEST_PATH, **(env or {})},
                    timeout=timeout,
                )
        except GuestAgentError as exc:
            raise CommandFailed(f"{argv[0]} in the guest: {exc}") from None
        if result.exitcode is None and result.signal is None:
            raise CommandFailed(f"{argv[0]} in the guest ended without an exit status")
        code = result.exitcode if result.exitcode is not None else 128 + (result.signal or 0)
        return CommandResult(argv, code, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))

    def open_session(self, argv: list[str], *, env: dict[str, str] | None = None) -> GuestSession:
        return GuestSession(self, argv, env)

    def read_file(self, path: str) -> bytes:
        try:
            with self.lock:
                return self.agent.read_file(path)
        except GuestAgentError as exc:
            raise CommandFailed(f"cannot read {path} in the guest: {exc}") from None

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], timeout=30).returncode == 0
