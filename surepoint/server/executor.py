"""Runs sessions: each step a child `surepoint ... --json` process in its own process group.

The child's stderr lines are the session log (stored as they come), its stdout the JSON result.
Cancelling sends SIGTERM to the child's process group (SIGKILL if it is still there after a grace
period). At start, sessions left `running` by a server that died are marked failed (interrupted)
and whatever is left of their processes is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import SurepointError
from surepoint.processes import process_start
from surepoint.server.config import ServerConfig
from surepoint.server.db import Database, now_iso
from surepoint.server.kinds import parse_spec

MAX_LOG_LINES = 20000
MAX_LINE = 2000
KILL_AFTER = 20.0
INTERRUPTED = "interrupted: the server stopped while this session ran"
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
_PASSED_ENV = (
    "SUREPOINT_REPO",
    "SUREPOINT_PASSPHRASE",
    "SUREPOINT_PASSPHRASE_FILE",
    "SUREPOINT_CATALOG",
    "SUREPOINT_FROM_PASSPHRASE",
    "SUREPOINT_FROM_PASSPHRASE_FILE",
)


def clean_line(line: str) -> str:
    """A log line safe to store and show: no terminal escapes or control characters, bounded length."""
    return _CONTROL.sub("", line.rstrip("\n"))[:MAX_LINE]


@dataclass
class Outcome:
    """What a finished session did, read from its children's exit codes, JSON and warnings."""

    state: str
    exit_code: int | None
    message: str = ""
    results: list = field(default_factory=list)
    bytes_read: int = 0
    bytes_stored: int = 0
    consistency: str | None = None
    failed_vms: list[str] = field(default_factory=list)


@dataclass
class _Running:
    session_id: int
    thread: threading.Thread
    proc: subprocess.Popen | None = None
    cancel_reason: str | None = None  # "cancelled" or INTERRUPTED


def summarize(results: list, exit_code: int | None, warned: bool, last_error: str) -> Outcome:
    """The session's state and figures from the parsed stdout of each step."""
    outcome = Outcome(state="success", exit_code=exit_code)
    for result in results:
        if not isinstance(result, dict):
            continue
        points = [result] if "disks" in result else []
        for vm in result.get("vms", []) if isinstance(result.get("vms"), list) else []:
            outcome.bytes_read += int(vm.get("read_bytes") or 0)
            outcome.bytes_stored += int(vm.get("stored_bytes") or 0)
            outcome.consistency = vm.get("consistency") or outcome.consistency
            if vm.get("status") == "failed":
                outcome.failed_vms.append(vm.get("vm", ""))
            elif vm.get("status") == "warning":
                warned = True
        for point in points:
            for disk in point.get("disks", []):
                outcome.bytes_read += int(disk.get("read_bytes") or 0)
                outcome.bytes_stored += int(disk.get("stored_bytes") or 0)
            outcome.consistency = point.get("consistency")
    if exit_code != 0:
        outcome.state = "failed"
        outcome.message = last_error or f"exit code {exit_code}"
    elif warned:
        outcome.state = "warning"
        outcome.message = last_error
    return outcome


class Executor:
    """Starts, watches and cancels session processes; calls `on_finished(session_id)` after each."""

    def __init__(self, db: Database, config: ServerConfig, on_finished: Callable[[int], None]) -> None:
        self.db = db
        self.config = config
        self.on_finished = on_finished
        self.host = socket.gethostname()
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()

    # -- what runs ---------------------------------------------------------------------------
    def running(self) -> list[int]:
        with self._lock:
            return list(self._running)

    def count_by_repository(self) -> dict[str, int]:
        rows = self.db.query(
            "SELECT repository, COUNT(*) AS n FROM sessions WHERE state = 'running' GROUP BY repository"
        )
        return {r["repository"]: int(r["n"]) for r in rows}

    # -- start, cancel, stop --------------------------------------------------------------------
    def start(self, session_id: int) -> None:
        """Mark the session running and run it in its own thread."""
        self.db.execute(
            "UPDATE sessions SET state = 'running', started = ?, host = ? WHERE id = ?",
            (now_iso(), self.host, session_id),
        )
        thread = threading.Thread(target=self._run, args=(session_id,), name=f"session-{session_id}", daemon=True)
        with self._lock:
            self._running[session_id] = _Running(session_id, thread)
        thread.start()

    def cancel(self, session_id: int, reason: str = "cancelled") -> bool:
        """Stop a running session (SIGTERM to its process group); False if it is not running here."""
        with self._lock:
            run = self._running.get(session_id)
            if run is None:
                return False
            run.cancel_reason = run.cancel_reason or reason
            proc = run.proc
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            timer = threading.Timer(KILL_AFTER, _kill_if_running, args=(proc,))
            timer.daemon = True
            timer.start()
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Server shutdown: interrupt every running session and wait for them to be recorded."""
        for session_id in self.running():
            self.cancel(session_id, INTERRUPTED)
        deadline = time.monotonic() + timeout
        for session_id in self.running():
            with self._lock:
                run = self._running.get(session_id)
            if run is not None:
                run.thread.join(max(0.1, deadline - time.monotonic()))

    def recover_interrupted(self) -> list[int]:
        """At start: sessions a dead server left running are failed (interrupted); their leftovers stopped."""
        rows = self.db.query(
            "SELECT id, pid, pid_start FROM sessions WHERE state IN ('starting', 'running') AND host IN (?, '')",
            (self.host,),
        )
        for row in rows:
            pid, start = row["pid"], row["pid_start"]
            if pid and start is not None and process_start(pid) == start:
                _signal_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + KILL_AFTER
                while process_start(pid) == start and time.monotonic() < deadline:
                    time.sleep(0.1)
                if process_start(pid) == start:
                    _signal_group(pid, signal.SIGKILL)
            self.db.execute(
                "UPDATE sessions SET state = 'failed', ended = ?, message = ?, pid = NULL WHERE id = ?",
                (now_iso(), INTERRUPTED, row["id"]),
            )
            self._log(row["id"], f"session {INTERRUPTED}")
        return [r["id"] for r in rows]

    # -- one session -----------------------------------------------------------------------------
    def _log(self, session_id: int, line: str) -> None:
        self.db.execute(
            "INSERT INTO session_log (session_id, time, line) VALUES (?, ?, ?)", (session_id, now_iso(), line)
        )

    def env_for(self, repository: str) -> dict[str, str]:
        """The environment of a child `surepoint` working on `repository` (its passphrase by file only)."""
        repo = self.config.repository(repository)
        env = {k: v for k, v in os.environ.items() if k not in _PASSED_ENV}
        env["SUREPOINT_REPO"] = repo.location
        if repo.passphrase_file:
            env["SUREPOINT_PASSPHRASE_FILE"] = repo.passphrase_file
        env["SUREPOINT_CATALOG"] = self.config.catalog_of(repo)
        env["SUREPOINT_SERVER_PID"] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _run(self, session_id: int) -> None:
        outcome = Outcome(state="failed", exit_code=None, message="the session did not start")
        try:
            outcome = self._run_steps(session_id)
        except SurepointError as exc:
            outcome = Outcome(state="failed", exit_code=None, message=str(exc))
            self._log(session_id, f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - recorded on the session: the server keeps running
            outcome = Outcome(state="failed", exit_code=None, message=f"internal error: {exc!r}")
            self._log(session_id, f"error: internal error: {exc!r}")
        finally:
            with self._lock:
                run = self._running.get(session_id)
            if run is not None and run.cancel_reason:
                outcome.state = "cancelled" if run.cancel_reason == "cancelled" else "failed"
                outcome.message = run.cancel_reason
            self.db.execute(
                "UPDATE sessions SET state = ?, ended = ?, exit_code = ?, message = ?, result = ?, bytes_read = ?, "
                "bytes_stored = ?, consistency = ?, pid = NULL WHERE id = ?",
                (
                    outcome.state,
                    now_iso(),
                    outcome.exit_code,
                    outcome.message[:2000],
                    json.dumps({"steps": outcome.results, "failed_vms": outcome.failed_vms}),
                    outcome.bytes_read,
                    outcome.bytes_stored,
                    outcome.consistency,
                    session_id,
                ),
            )
            with self._lock:
                self._running.pop(session_id, None)
            try:
                self.on_finished(session_id)
            except Exception as exc:  # noqa: BLE001 - a notification failure must not stop the executor
                self._log(session_id, f"warning: after-session actions failed: {exc!r}")

    def _run_steps(self, session_id: int) -> Outcome:
        row = self.db.one("SELECT kind, repository, spec FROM sessions WHERE id = ?", (session_id,))
        if row is None:
            raise SurepointError(f"session {session_id} is gone")
        steps, extra_env = parse_spec(row["kind"], json.loads(row["spec"])).plan(self.config, row["repository"])
        env = self.env_for(row["repository"]) | extra_env
        os.makedirs(os.path.dirname(env["SUREPOINT_CATALOG"]), mode=0o700, exist_ok=True)
        results: list = []
        warned = False
        last_error = ""
        exit_code: int | None = 0
        lines = 0
        for argv in steps:
            with self._lock:
                run = self._running[session_id]
                if run.cancel_reason:
                    break
            self._log(session_id, "$ surepoint " + " ".join(argv))
            proc = subprocess.Popen(
                [sys.executable, "-m", "surepoint.server.child", *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.config.state_dir,
                start_new_session=True,
                text=True,
                errors="replace",
            )
            with self._lock:
                run.proc = proc
                cancelled_already = bool(run.cancel_reason)
            if cancelled_already:
                _signal_group(proc.pid, signal.SIGTERM)
            self.db.execute(
                "UPDATE sessions SET pid = ?, pid_start = ? WHERE id = ?",
                (proc.pid, process_start(proc.pid), session_id),
            )
            stdout: list[str] = []
            reader = threading.Thread(target=lambda p=proc, out=stdout: out.append(p.stdout.read()), daemon=True)
            reader.start()
            for raw in proc.stderr:
                line = clean_line(raw)
                if not line.strip():
                    continue
                if line.startswith("warning:"):
                    warned = True
                if line.startswith("error:"):
                    last_error = line[len("error:") :].strip()
                lines += 1
                if lines <= MAX_LOG_LINES:
                    self._log(session_id, line)
            exit_code = proc.wait()
            reader.join()
            text = "".join(stdout).strip()
            try:
                results.append(json.loads(text) if text else None)
            except ValueError:
                results.append({"output": text[-4000:]})
            if exit_code != 0:
                break
        if lines > MAX_LOG_LINES:
            self._log(session_id, f"({lines - MAX_LOG_LINES} more log lines not kept)")
        outcome = summarize(results, exit_code, warned, last_error)
        outcome.results = results
        return outcome


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_if_running(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
