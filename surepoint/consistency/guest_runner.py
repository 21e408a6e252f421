"""Run writer commands inside a KVM guest through qemu-guest-agent: nothing installed in the guest.

One-shot commands use guest-exec with argument vectors. A session (psql holding a backup open,
mariadb holding a read lock) needs a process fed over time, which guest-exec cannot do; for that
a small /bin/sh relay is written into a private directory in the guest at job time and removed
afterwards. The relay starts the client reading from a FIFO, copies each request file the host
writes into it, and the host reads the client's output file through guest-file-read.

A job that dies (killed, host crash) cannot close its sessions, and a client holding a backup or
a lock open must not outlive it. Two guards: the relay holds a lease that every request (and a
ping the host sends while it waits for an answer) renews; when it runs out the relay ends the
client and removes its directory. And the agent's channel takes one client at a time, so when a
runner opens its first session, any other relay directory in the guest belongs to a job that is
gone: its client is ended and the directory removed then and there.
"""

from __future__ import annotations

import secrets
import threading
import time

from surepoint.consistency.runner import CommandFailed, CommandResult, one_line
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_WORKDIR = "/run"
DIR_PREFIX = "surepoint-"
TICK = 0.05  # the relay's polling interval, seconds
SESSION_LEASE = 120.0  # seconds a relay waits without hearing from the host before it ends its client
PING_EVERY = 10.0  # how often the host renews the lease while it waits for an answer
CLIENT_GRACE = 10.0  # seconds a client gets to end after its input closes, before SIGTERM

# $1 = private directory, $2 = lease in ticks, $3 = grace in ticks, the rest = the client's argument
# vector. No host text is ever pasted into this script: names and arguments reach it only as argv.
# `kill -0` alone cannot tell an ended client (a zombie until `wait`) from a running one, so the
# client's own shell writes "done" when it ends.
RELAY = """#!/bin/sh
dir=$1
lease=$2
grace=$3
shift 3
echo $$ > "$dir/pid"
mkfifo -m 600 "$dir/in" || exit 90
( "$@" < "$dir/in" > "$dir/out" 2>&1; echo $? > "$dir/done" ) &
client=$!
exec 3> "$dir/in"
n=0
idle=0
expired=0
while :; do
    if [ -e "$dir/req.$n.ready" ]; then
        cat "$dir/req.$n" >&3
        rm -f "$dir/req.$n" "$dir/req.$n.ready"
        n=$((n + 1))
        idle=0
    elif [ -e "$dir/ping" ]; then
        rm -f "$dir/ping"
        idle=0
    elif [ -e "$dir/close" ] || [ -e "$dir/done" ]; then
        break
    elif [ "$idle" -ge "$lease" ]; then
        expired=1
        break
    else
        sleep 0.05
        idle=$((idle + 1))
    fi
done
exec 3>&-
i=0
while [ ! -e "$dir/done" ] && [ "$i" -lt "$grace" ]; do
    sleep 0.05
    i=$((i + 1))
done
if [ ! -e "$dir/done" ]; then
    pkill -TERM -P "$client" 2>/dev/null
    kill -TERM "$client" 2>/dev/null
fi
wait "$client"
code=$(cat "$dir/done" 2>/dev/null)
echo "${code:-143}" > "$dir/exit"
if [ "$expired" = 1 ]; then
    rm -rf "$dir"
fi
exit "${code:-143}"
"""


def client_name(argv: list[str]) -> str:
    """The program a session talks to, for messages: psql rather than the runuser that starts it."""
    if argv and argv[0].rsplit("/", 1)[-1] in ("runuser", "sudo", "su") and "--" in argv[:-1]:
        return argv[argv.index("--") + 1]
    return argv[0] if argv else "?"


class GuestSession:
    def __init__(self, runner: GuestRunner, argv: list[str], env: dict[str, str] | None) -> None:
        self.runner = runner
        self.argv = argv
        self.client = client_name(argv)
        agent = runner.agent
        self.dir = f"{GUEST_WORKDIR}/{DIR_PREFIX}{secrets.token_hex(6)}"
        self._requests = 0
        self._buffer = b""
        self._out_handle: int | None = None
        self._exit_code: int | None = None
        runner.run(["mkdir", "-m", "700", "--", self.dir], timeout=30).check()
        ticks = [str(max(1, round(seconds / TICK))) for seconds in (runner.session_lease, CLIENT_GRACE)]
        try:
            with runner.lock:
                agent.write_file(f"{self.dir}/relay.sh", RELAY.encode())
                self.pid = agent.exec_start(
                    ["/bin/sh", f"{self.dir}/relay.sh", self.dir, *ticks, *argv],
                    env={"PATH": GUEST_PATH, **(env or {})},
                    capture=False,
                )
        except GuestAgentError as exc:
            self._cleanup()
            raise CommandFailed(f"cannot start {self.client} in the guest: {exc}") from None
        runner._sessions.append(self)

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

    def ping(self) -> None:
        """Renew the relay's lease; best effort (the agent refuses file access while the guest is frozen)."""
        try:
            with self.runner.lock:
                self.runner.agent.write_file(f"{self.dir}/ping", b"")
        except GuestAgentError:
            pass

    def request(self, text: str, marker: str, timeout: float) -> str:
        name = f"{self.dir}/req.{self._requests}"
        try:
            with self.runner.lock:
                self.runner.agent.write_file(name, text.encode())
                self.runner.agent.write_file(name + ".ready", b"")
        except GuestAgentError as exc:
            raise CommandFailed(f"{self.client} session in the guest: {exc}") from None
        self._requests += 1
        self.runner._renewed = time.monotonic()  # every relay of this runner hears from the host below
        want = marker.encode()
        deadline = time.monotonic() + timeout
        while want not in self._buffer:
            try:
                self._read_output()
                if want in self._buffer:
                    break
                exited = self._exited()
                if exited:
                    self._read_output()
            except GuestAgentError as exc:
                raise CommandFailed(f"{self.client} session in the guest: {exc}") from None
            if exited:
                if want in self._buffer:
                    break
                said = one_line(self._buffer.decode(errors="replace"))[-300:]  # psql's error and its hint
                raise CommandFailed(f"{self.client} session in the guest ended: {said}")
            if time.monotonic() > deadline:
                raise CommandFailed(f"{self.client} in the guest did not answer within {timeout:.0f} s")
            self.runner.keepalive()
            time.sleep(0.05)
        before, _, after = self._buffer.partition(want)
        self._buffer = after.lstrip(b"\n")
        return before.decode(errors="replace")

    def _exited(self) -> bool:
        """Whether the relay has ended (the agent reports an exit once, then forgets the process)."""
        if self._exit_code is not None:
            return True
        with self.runner.lock:
            status = self.runner.agent.exec_status(self.pid)
        if status.get("exited"):
            self._exit_code = int(status.get("exitcode") or 0) if status.get("signal") is None else -1
            return True
        return False

    def close(self, timeout: float = CLIENT_GRACE + 5) -> int:
        """End the client (end of input; SIGTERM after a grace period), wait for it, remove the directory."""
        try:
            if self._exit_code is None:
                with self.runner.lock:
                    self.runner.agent.write_file(f"{self.dir}/close", b"")
                deadline = time.monotonic() + timeout
                while not self._exited() and time.monotonic() < deadline:
                    time.sleep(0.1)
        except GuestAgentError:
            pass
        self._cleanup()
        return self._exit_code if self._exit_code is not None else -1

    def _cleanup(self) -> None:
        if self in self.runner._sessions:
            self.runner._sessions.remove(self)
        try:
            with self.runner.lock:
                if self._out_handle is not None:
                    handle, self._out_handle = self._out_handle, None
                    self.runner.agent.file_close(handle)
        except GuestAgentError:
            pass
        try:
            self.runner.run(["rm", "-rf", "--", self.dir], timeout=30)
        except CommandFailed:
            pass


class GuestRunner:
    """Runs commands in a guest; `lock` serialises use of the one guest-agent connection."""

    def __init__(self, agent: GuestAgent, vm_name: str = "guest", *, session_lease: float = SESSION_LEASE) -> None:
        self.agent = agent
        self.where = f"guest:{vm_name}"
        self.lock = threading.RLock()
        self.session_lease = session_lease
        self._sessions: list[GuestSession] = []
        self._swept = False
        self._renewed = time.monotonic()

    def run(
        self, argv: list[str], *, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
    ) -> CommandResult:
        self.keepalive()
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

    def keepalive(self) -> None:
        """Renew the lease of every open session when it is due (called while the host waits on the guest)."""
        if not self._sessions or time.monotonic() - self._renewed < min(PING_EVERY, self.session_lease / 4):
            return
        self._renewed = time.monotonic()
        for session in list(self._sessions):
            session.ping()

    def open_session(self, argv: list[str], *, env: dict[str, str] | None = None) -> GuestSession:
        if not self._swept:
            self._swept = True
            try:
                self.sweep_stale_sessions()
            except CommandFailed:
                pass  # tidying up after others must not fail this job; their relays' leases still run out
        return GuestSession(self, argv, env)

    def sweep_stale_sessions(self, timeout: float = CLIENT_GRACE + 5) -> list[str]:
        """End the relays (and so the clients: a psql holding a backup open, a lock) of jobs that died, and
        remove their directories. Only one client talks to a guest agent at a time, so a relay directory
        that is not one of this runner's sessions belongs to a job that is gone. Returns what was removed."""
        ours = {s.dir for s in self._sessions}
        found = self.run(
            ["find", GUEST_WORKDIR, "-mindepth", "1", "-maxdepth", "1", "-type", "d", "-name", f"{DIR_PREFIX}*"],
            timeout=30,
        )  # exit status 1 when a directory goes while find looks (a relay whose lease ran out): still a list
        stale = [d for d in found.stdout.splitlines() if d.strip() and d not in ours]
        live = []
        for path in stale:
            pid = self.run(["cat", "--", f"{path}/pid"], timeout=30).stdout.strip()
            if pid.isdigit() and self.exists(f"/proc/{pid}"):
                try:
                    with self.lock:
                        self.agent.write_file(f"{path}/close", b"")
                    live.append(path)
                except GuestAgentError:
                    pass
        deadline = time.monotonic() + timeout
        while live and time.monotonic() < deadline:
            live = [d for d in live if not self.exists(f"{d}/exit") and self.exists(d)]
            if live:
                time.sleep(0.2)
        for path in stale:
            self.run(["rm", "-rf", "--", path], timeout=30)
        return stale

    def read_file(self, path: str) -> bytes:
        try:
            with self.lock:
                return self.agent.read_file(path)
        except GuestAgentError as exc:
            raise CommandFailed(f"cannot read {path} in the guest: {exc}") from None

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], timeout=30).returncode == 0
