"""The tests ("checks") the lab runs on a VM booted from a backup: does it live, answer, and hold good data?

Each check has a time limit and ends in a CheckResult, never in an exception: one broken VM or
database must not stop the lab from testing the others. Outcomes:
  passed   the VM did what the check asks;
  failed   it did not (a port closed, a corrupt table, a script's exit code), with the evidence;
  timeout  a command was still running when the check's time ran out (it is killed in the guest too);
  error    the check could not be carried out (no guest agent, no address known, no lab network).

Checks in the guest run through qemu-guest-agent (guest-exec with argument vectors; user text is
never pasted into a shell string), each under the guest's `timeout` command so nothing keeps
running after its check gave up. Network checks run as probes inside the lab's namespace
(surepoint.lab.probe). The agent's channel takes one client at a time: a check opens its own
connection and closes it when done.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from surepoint.consistency.guest_runner import GUEST_PATH
from surepoint.lab.check_spec import CheckSpec
from surepoint.lab.probe import run_probe
from surepoint.vm.errors import GuestAgentError, GuestAgentTimeout
from surepoint.vm.guest_agent import GuestAgent

OUTCOMES = ("passed", "failed", "timeout", "error")
MAX_OUTPUT = 4000  # characters of command output kept in a result (its end: errors come last)
AGENT_CALL_TIMEOUT = 30.0  # one guest-agent request (not the command it runs)
RETRY_EVERY = 2.0  # seconds between readiness polls (agent, database server)
KILL_AFTER = 2  # seconds the guest's `timeout` waits after SIGTERM before SIGKILL
TIMEOUT_EXITS = (124, 137)  # `timeout`: the command timed out (137: it needed SIGKILL)
# guest-exec replaces the agent's environment: give commands a usual root one (HOME: ~/.my.cnf).
GUEST_ENV = {"PATH": GUEST_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8"}


# -- running -------------------------------------------------------------------------------------


@dataclass
class CheckContext:
    """What a check needs to know about the lab VM it tests."""

    vm: str  # label of the lab VM
    guest_agent: str | None  # path of its guest-agent socket
    network_prefix: list[str] | None  # command prefix into the lab namespace; None: lab without network
    addresses: list[str]  # the VM's IPv4 addresses seen in the guest (may be empty)
    deadline: float | None = None  # time.monotonic() deadline of the whole lab: no check runs past it


@dataclass
class CheckResult:
    """How one check ended: outcome passed | failed | timeout | error, and the evidence."""

    name: str
    type: str
    outcome: str
    output: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class _Finished(Exception):
    """Ends a check early with an outcome (raised inside the check functions only)."""

    def __init__(self, outcome: str, output: str) -> None:
        super().__init__(output)
        self.outcome = outcome
        self.output = output


class _Clock:
    """The time a check has left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _trim(text: str, limit: int = MAX_OUTPUT) -> str:
    """The end of a long output (where errors are), marked as cut."""
    text = text.strip()
    return text if len(text) <= limit else "[…]\n" + text[-limit:]


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


def run_check(spec: CheckSpec, ctx: CheckContext) -> CheckResult:
    """Run one check within its timeout (and the lab's deadline); never raises for a failing VM."""
    started = time.monotonic()
    budget = spec.timeout
    if ctx.deadline is not None:
        budget = min(budget, ctx.deadline - started)
    if budget <= 0:
        return CheckResult(spec.name, spec.type, "timeout", "the lab's timeout was reached before this test", 0.0)
    clock = _Clock(budget)
    try:
        outcome, output = _RUNNERS[spec.type](spec.options, ctx, clock)
    except _Finished as done:
        outcome, output = done.outcome, done.output
    except GuestAgentTimeout as exc:
        outcome, output = "timeout", f"{exc} (the test's time limit is {budget:g} s)"
    except GuestAgentError as exc:
        outcome, output = "error", f"guest agent of {ctx.vm}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one broken check must not end the lab
        outcome, output = "error", f"the test broke: {type(exc).__name__}: {exc}"
    return CheckResult(spec.name, spec.type, outcome, _trim(output), round(time.monotonic() - started, 3))


# -- guest agent -----------------------------------------------------------------------------------


def _agent(ctx: CheckContext, clock: _Clock) -> GuestAgent:
    if not ctx.guest_agent:
        raise _Finished("error", f"{ctx.vm} has no guest agent channel")
    return GuestAgent(ctx.guest_agent, timeout=max(1.0, min(AGENT_CALL_TIMEOUT, clock.left())))


@dataclass
class _Ran:
    exitcode: int | None
    signal: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.signal is None and self.exitcode == 0

    @property
    def output(self) -> str:
        return "\n".join(part.strip() for part in (self.stdout, self.stderr) if part.strip())

    def how(self) -> str:
        return f"signal {self.signal}" if self.signal is not None else f"exit code {self.exitcode}"


def _guest_run(
    agent: GuestAgent,
    argv: list[str],
    clock: _Clock,
    env: Mapping[str, str] | None = None,
    what: str = "",
    input: str | None = None,
) -> _Ran:
    """Run argv in the guest under `timeout`, so it ends there too when the check's time runs out.

    The guest's limit is a little shorter than the host's wait, so the usual end of a command that
    hangs is `timeout` killing it (exit 124/137) and its partial output coming back.
    """
    left = clock.left()
    if left <= 0.5:
        raise _Finished("timeout", f"no time left to run {what or argv[0]} (the test's limit is {clock.seconds:g} s)")
    limit = max(0.5, left - min(3.0, left * 0.2))
    started = time.monotonic()
    result = agent.exec(
        ["timeout", "-k", str(KILL_AFTER), f"{limit:.1f}", *argv],
        input=None if input is None else input.encode(),
        env={**GUEST_ENV, **(env or {})},
        timeout=left,
    )
    ran = _Ran(result.exitcode, result.signal, _text(result.stdout), _text(result.stderr))
    if ran.exitcode in TIMEOUT_EXITS and time.monotonic() - started >= limit - 0.5:
        said = f":\n{ran.output}" if ran.output else ""
        raise _Finished("timeout", f"{what or argv[0]} was still running after {limit:.1f} s and was killed{said}")
    if ran.exitcode == 127 and not ran.stdout and "No such file" in ran.stderr:
        raise _Finished("error", f"{argv[0]} is not installed in the guest: {ran.stderr.strip()}")
    return ran


def _guest_which(agent: GuestAgent, candidates: list[str], clock: _Clock) -> str | None:
    """The first of the candidate programs (names or paths) that the guest has."""
    script = 'for t in "$@"; do command -v "$t" >/dev/null 2>&1 && { echo "$t"; exit 0; }; done; exit 1'
    ran = _guest_run(agent, ["sh", "-c", script, "sh", *candidates], clock, what="a lookup of " + candidates[0])
    return (ran.stdout.strip() or None) if ran.ok else None


def _wait_until_ready(agent: GuestAgent, argv: list[str], clock: _Clock, what: str) -> _Ran:
    """Poll a readiness command until it exits 0; a server that never gets ready fails the check
    (even when the last poll hung until the time ran out: the server did not answer)."""
    started = time.monotonic()
    while True:
        try:
            ran = _guest_run(agent, argv, clock, what=what)
        except _Finished as done:
            if done.outcome != "timeout":
                raise
            said = done.output
        else:
            if ran.ok:
                return ran
            said = ran.output or ran.how()
        if clock.left() <= RETRY_EVERY + 1:
            waited = time.monotonic() - started
            raise _Finished(
                "failed", f"{what} did not get ready (waited {waited:.0f} s of the test's {clock.seconds:g} s): {said}"
            )
        time.sleep(RETRY_EVERY)


def _expect_first_line(options: Mapping[str, Any], ran: _Ran, what: str) -> None:
    expect = options.get("expect")
    if expect is None:
        return
    lines = ran.stdout.splitlines()
    first = lines[0].strip() if lines else ""
    if first != expect.strip():
        raise _Finished("failed", f"{what} returned {first!r}, expected {expect!r}:\n{ran.output}")


def guest_addresses(agent_path: str, timeout: float = 30) -> list[str]:
    """The guest's IPv4 addresses (not loopback, not link-local) from guest-network-get-interfaces.

    One query on a connection of its own; GuestAgentError if the agent does not answer. A guest
    whose network is not up yet has none: callers that must wait for one ask again.
    """
    with GuestAgent(agent_path, timeout=timeout) as agent:
        interfaces = agent.execute("guest-network-get-interfaces") or []
    found: list[str] = []
    for interface in interfaces:
        for entry in interface.get("ip-addresses") or []:
            if entry.get("ip-address-type") != "ipv4":
                continue
            try:
                address = ipaddress.IPv4Address(entry.get("ip-address", ""))
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local) and str(address) not in found:
                found.append(str(address))
    return found


# -- the checks --------------------------------------------------------------------------------------

Outcome = tuple[str, str]


def _heartbeat(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    if not ctx.guest_agent:
        raise _Finished("error", f"{ctx.vm} has no guest agent channel")
    attempts = 0
    while True:
        attempts += 1
        try:
            call = max(1.0, min(10.0, clock.left()))
            with GuestAgent(ctx.guest_agent, timeout=call) as agent:
                agent.ping()
                info = agent.info()
            version = info.get("version", "?") if isinstance(info, dict) else "?"
            return "passed", f"qemu-guest-agent {version} answers guest-ping and guest-info"
        except GuestAgentError as exc:
            last = str(exc)
        if clock.left() <= 1.0:
            return "failed", f"the guest agent did not answer within {clock.seconds:g} s ({attempts} tries): {last}"
        time.sleep(min(1.0, clock.left() - 1.0))


def _target(options: Mapping[str, Any], ctx: CheckContext) -> tuple[list[str], str]:
    if ctx.network_prefix is None:
        raise _Finished("error", "the lab has no network: network tests cannot run")
    address = options.get("address") or (ctx.addresses[0] if ctx.addresses else None)
    if not address:
        raise _Finished("error", f"no address known for {ctx.vm}: the guest reports no IPv4 address; set `address`")
    return ctx.network_prefix, address


def _probe_outcome(ok: bool, detail: str, timed_out: bool) -> Outcome:
    return ("passed" if ok else "timeout" if timed_out else "failed"), detail


def _ping(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    prefix, address = _target(options, ctx)
    result = run_probe(prefix, "icmp", [address, "--count", str(options.get("count", 1))], clock.left())
    return _probe_outcome(result.ok, result.detail, result.timed_out)


def _port(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    prefix, address = _target(options, ctx)
    result = run_probe(prefix, "tcp", [address, str(options["port"])], clock.left())
    return _probe_outcome(result.ok, result.detail, result.timed_out)


def _postgresql(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    database = options.get("database", "postgres")
    query = options.get("query", "SELECT 1")
    as_user = ["runuser", "-u", options.get("user", "postgres"), "--"]
    env = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "surepoint-lab"}
    psql = [*as_user, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", database]
    report: list[str] = []
    with _agent(ctx, clock) as agent:
        ready = _wait_until_ready(agent, [*as_user, "pg_isready", "-t", "5"], clock, "PostgreSQL")
        report.append(ready.output)
        ran = _guest_run(agent, [*psql, "-c", query], clock, env, what="the query")
        if not ran.ok:
            raise _Finished("failed", f"the query failed ({ran.how()}):\n{ran.output}")
        _expect_first_line(options, ran, "the query")
        report.append(f"query: {ran.stdout.strip()[:500]}")
        if options.get("amcheck", True):
            version = _guest_run(agent, [*psql, "-c", "SHOW server_version_num"], clock, env, what="psql")
            if not version.ok:
                raise _Finished("failed", f"cannot ask the server version ({version.how()}):\n{version.output}")
            major = int(version.stdout.strip() or 0) // 10000
            # Debian keeps pg_amcheck out of PATH, in the version's own bin folder.
            tool = _guest_which(agent, [f"/usr/lib/postgresql/{major}/bin/pg_amcheck", "pg_amcheck"], clock)
            if tool is None:
                raise _Finished("error", f"pg_amcheck (PostgreSQL {major}) is not installed in the guest")
            argv = [*as_user, tool, "--heapallindexed", "--install-missing", "-d", database]
            check = _guest_run(agent, argv, clock, env, what="pg_amcheck")
            if not check.ok:
                raise _Finished("failed", f"pg_amcheck found problems ({check.how()}):\n{check.output}")
            report.append(f"pg_amcheck --heapallindexed {database}: no corruption found")
    return "passed", "\n".join(r for r in report if r)


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _table_verdicts(rows: list[list[str]]) -> dict[str, bool]:
    """CHECK TABLE rows (Table, Op, Msg_type, Msg_text): per table, whether it says OK and no error."""
    verdicts: dict[str, bool] = {}
    broken: set[str] = set()
    for row in rows:
        if len(row) < 4:
            continue
        table, kind, text = row[0], row[2].lower(), row[3]
        verdicts.setdefault(table, False)
        if kind == "error":
            broken.add(table)
        elif (kind == "status" and text == "OK") or (kind == "note" and "doesn't support check" in text):
            verdicts[table] = True  # a note: an engine without CHECK TABLE (MEMORY, ...) has nothing to find
    return {table: good and table not in broken for table, good in verdicts.items()}


def _mariadb(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    database = options["database"]
    with _agent(ctx, clock) as agent:
        admin = _guest_which(agent, ["mariadb-admin", "mysqladmin"], clock) or "mariadb-admin"
        client = "mysql" if admin == "mysqladmin" else "mariadb"
        ready = _wait_until_ready(agent, [admin, "--connect-timeout=5", "ping"], clock, "MariaDB")
        report = [ready.output]
        # The database is chosen by argument, never pasted into SQL.
        sql = [client, "--batch", "--skip-column-names", "--connect-timeout=10", f"--database={database}", "-e"]
        if options.get("query"):
            ran = _guest_run(agent, [*sql, options["query"]], clock, what="the query")
            if not ran.ok:
                raise _Finished("failed", f"the query failed ({ran.how()}):\n{ran.output}")
            _expect_first_line(options, ran, "the query")
            report.append(f"query: {ran.stdout.strip()[:500]}")
        tables = options.get("tables")
        if not tables:
            listing = _guest_run(agent, [*sql, "SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'"], clock)
            if not listing.ok:
                raise _Finished("failed", f"cannot list the tables of {database} ({listing.how()}):\n{listing.output}")
            tables = [line.split("\t")[0] for line in listing.stdout.splitlines() if line.strip()]
            if not tables:
                report.append(f"database {database} has no tables to check")
                return "passed", "\n".join(r for r in report if r)
        statement = "CHECK TABLE " + ", ".join(_quote_identifier(t) for t in tables)
        check = _guest_run(agent, [*sql, statement], clock, what="CHECK TABLE")
        verdicts = _table_verdicts([line.split("\t") for line in check.stdout.splitlines()])
        report.append(check.output)
        bad = sorted(t for t, good in verdicts.items() if not good)
        if not check.ok or bad or len(verdicts) < len(tables):
            what = f"not OK: {', '.join(bad)}" if bad else f"CHECK TABLE failed ({check.how()})"
            raise _Finished("failed", f"{what}\n" + "\n".join(r for r in report if r))
        report.append(f"{len(verdicts)} table(s) of {database} OK")
    return "passed", "\n".join(r for r in report if r)


def _sqlite(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    path = options["path"]
    with _agent(ctx, clock) as agent:
        # sqlite3 would create a missing database: look first.
        if not _guest_run(agent, ["test", "-f", path], clock).ok:
            raise _Finished("failed", f"{path} does not exist in the guest (or is not a file)")
        # No ~/.sqliterc (it could turn on headers or another output mode); the query comes on stdin,
        # so a query that starts with "--" is not taken for an option.
        sqlite3 = ["sqlite3", "-init", "/dev/null", "-batch", "-bail", path]
        check = _guest_run(agent, sqlite3, clock, input="PRAGMA integrity_check;\n")
        if not check.ok or check.stdout.strip() != "ok":
            raise _Finished("failed", f"PRAGMA integrity_check of {path} ({check.how()}):\n{check.output}")
        report = [f"PRAGMA integrity_check of {path}: ok"]
        if options.get("query"):
            ran = _guest_run(agent, sqlite3, clock, what="the query", input=options["query"] + "\n")
            if not ran.ok:
                raise _Finished("failed", f"the query failed ({ran.how()}):\n{ran.output}")
            _expect_first_line(options, ran, "the query")
            report.append(f"query: {ran.stdout.strip()[:500]}")
    return "passed", "\n".join(report)


def _script(options: Mapping[str, Any], ctx: CheckContext, clock: _Clock) -> Outcome:
    argv = list(options["argv"])
    expect = options.get("expect_exit", 0)
    if options.get("where", "guest") == "lab":
        exitcode, output = _lab_script(argv, ctx, clock)
        how = f"exit code {exitcode}" if exitcode >= 0 else f"signal {-exitcode}"
    else:
        with _agent(ctx, clock) as agent:
            ran = _guest_run(agent, argv, clock, what=argv[0])
        exitcode = ran.exitcode if ran.signal is None and ran.exitcode is not None else -1
        how, output = ran.how(), ran.output
    outcome = "passed" if exitcode == expect else "failed"
    return outcome, f"{how} (expected {expect})" + (f":\n{output}" if output else "")


def _lab_script(argv: list[str], ctx: CheckContext, clock: _Clock) -> tuple[int, str]:
    """Run argv on the host inside the lab namespace; its process group is killed at the time limit."""
    if ctx.network_prefix is None:
        raise _Finished("error", "the lab has no network: a lab script cannot run")
    env = dict(os.environ, SUREPOINT_LAB_VM=ctx.vm, SUREPOINT_LAB_ADDRESS=ctx.addresses[0] if ctx.addresses else "")
    try:
        proc = subprocess.Popen(
            [*ctx.network_prefix, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise _Finished("error", f"cannot run {argv[0]}: {exc}") from None
    try:
        out, _ = proc.communicate(timeout=max(0.1, clock.left()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        said = _text(out).strip()
        raise _Finished(
            "timeout",
            f"{argv[0]} was still running after {clock.seconds:g} s and was killed" + (f":\n{said}" if said else ""),
        ) from None
    return proc.returncode, _text(out)


_RUNNERS: dict[str, Callable[[Mapping[str, Any], CheckContext, _Clock], Outcome]] = {
    "heartbeat": _heartbeat,
    "ping": _ping,
    "port": _port,
    "postgresql": _postgresql,
    "mariadb": _mariadb,
    "sqlite": _sqlite,
    "script": _script,
}
