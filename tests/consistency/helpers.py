"""Real servers on a real reflink filesystem, for the application-aware backup tests.

Layout of one test's work folder (under /tmp, readable by the postgres and mysql users):

    store.xfs        a sparse file holding an XFS filesystem with reflink=1
    store/           that filesystem, loop-mounted; the job's source lives here
    store/db.img     the "disk image": an ext4 filesystem, loop-mounted at disk/
    disk/            the image's filesystem: database data directories live here
    run/             sockets, pid files and server logs (outside the image)
    wal_archive/     PostgreSQL's WAL archive (outside the image)

Everything is undone by `Work.close()`: file systems thawed first, then load generators and
servers stopped, then everything unmounted, even when a test failed half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# fsfreeze, mkfs.xfs, mariadbd and runuser live in sbin, which a non-login PATH may lack; the CLI
# (run with this environment) calls fsfreeze and runuser by name too.
for _sbin in ("/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _sbin
IMAGE_SIZE = 512 << 20
STORE_SIZE = 3 << 30  # sparse: only what is written takes space

NEEDED_TOOLS = {
    "mkfs.xfs": "xfsprogs",
    "mkfs.ext4": "e2fsprogs",
    "fsfreeze": "util-linux",
    "losetup": "util-linux",
    "runuser": "util-linux",
    "sqlite3": "sqlite3",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
    "psql": "postgresql-client-15",
}


def missing_tools() -> list[str]:
    missing = [f"{tool} ({pkg})" for tool, pkg in NEEDED_TOOLS.items() if shutil.which(tool) is None]
    missing += [
        f"{PG_BIN / t} (postgresql-15)" for t in ("initdb", "pg_ctl", "pg_amcheck") if not (PG_BIN / t).exists()
    ]
    return missing


def sh(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chown(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


def unmount(path: Path) -> None:
    """Unmount, retrying while something still lets go of it; lazily as a last resort."""
    if not os.path.ismount(path):
        return
    sh(["fsfreeze", "--unfreeze", path], check=False, timeout=30)
    for _ in range(20):
        if sh(["umount", path], check=False, timeout=60).returncode == 0:
            return
        time.sleep(0.25)
    sh(["umount", "--lazy", path], check=False, timeout=60)


def utc_timestamp(iso: str) -> float:
    """A catalog event time (2026-01-31T12:00:00.123456Z) as a POSIX timestamp."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Work:
    """One test's folders, file systems, servers and load generators, with their teardown."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spc-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self._stack = contextlib.ExitStack()
        self._mounts: list[Path] = []
        self.run_dir = self.dir / "run"
        self.run_dir.mkdir()
        os.chmod(self.run_dir, 0o777)

    # teardown ------------------------------------------------------------------------------

    def defer(self, fn: Callable, *args) -> None:
        self._stack.callback(fn, *args)

    def close(self) -> None:
        # A frozen filesystem left behind would hang every later writer: thaw before anything else.
        for mount in self._mounts:
            sh(["fsfreeze", "--unfreeze", mount], check=False, timeout=30)
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # file systems ------------------------------------------------------------------------

    def mount(self, image: Path, mountpoint: Path, *options: str) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        opts = ",".join(("loop", *options))
        sh(["mount", "-o", opts, image, mountpoint])
        self._mounts.append(mountpoint)
        self.defer(unmount, mountpoint)
        return mountpoint

    def make_store(self) -> Path:
        """An XFS file system with reflink support, where the disk images live."""
        backing = self.dir / "store.xfs"
        with open(backing, "wb") as f:
            f.truncate(STORE_SIZE)
        sh(["mkfs.xfs", "-q", "-m", "reflink=1", backing])
        self.store = self.mount(backing, self.dir / "store")
        return self.store

    def make_disk(self) -> Path:
        """The disk image (ext4) in the store, mounted at disk/: the job's source and fsfreeze target."""
        self.image = self.store / "db.img"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", self.image])
        self.disk = self.mount(self.image, self.dir / "disk")
        return self.disk

    def mount_restored(self, restored: Path, name: str = "restored") -> Path:
        """Mount a read-write reflink copy of a restored image, leaving the restored file untouched."""
        copy = restored.with_name(restored.stem + "-rw.img")
        sh(["cp", "--reflink=always", restored, copy])
        return self.mount(copy, self.dir / name)


def write_job(path: Path, *, name: str, sources: list[Path], writers: list[dict], **settings) -> Path:
    """A TOML job file (values are strings, numbers and lists of strings)."""

    def value(v) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        return json.dumps(str(v))

    lines = [f"name = {value(name)}", f"sources = {value([str(s) for s in sources])}"]
    lines += [f"{k} = {value(v)}" for k, v in settings.items()]
    for writer in writers:
        lines += ["", "[[writers]]"] + [f"{k} = {value(v)}" for k, v in writer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# PostgreSQL -------------------------------------------------------------------------------


class Postgres:
    """A PostgreSQL 15 cluster run as the postgres user, reached over a unix socket in run/."""

    def __init__(self, work: Work, datadir: Path, *, port: int | None = None, socket_dir: Path | None = None) -> None:
        self.work = work
        self.datadir = datadir
        self.port = port or free_port()
        self.socket_dir = socket_dir or work.run_dir
        self.log = work.run_dir / f"postgres-{self.port}.log"
        self.extra: list[str] = []

    def initdb(self, archive: Path) -> None:
        self.datadir.mkdir(parents=True)
        chown(self.datadir, "postgres")
        os.chmod(self.datadir, 0o700)
        self.archive = archive
        archive.mkdir(exist_ok=True)
        chown(archive, "postgres")
        sh(
            [
                "runuser", "-u", "postgres", "--", PG_BIN / "initdb", "-D", self.datadir, "-U", "postgres",
                "-A", "trust", "--wal-segsize=1", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ]
        )  # fmt: skip
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                f"""
listen_addresses = ''
port = {self.port}
unix_socket_directories = '{self.socket_dir}'
wal_level = replica
archive_mode = on
archive_command = 'test ! -f {archive}/%f && cp %p {archive}/%f'
archive_timeout = 0
shared_buffers = 16MB
max_wal_size = 64MB
min_wal_size = 4MB
max_connections = 20
"""
            )

    def start(self, *options: str) -> None:
        opts = " ".join(options)
        self.log.touch()
        chown(self.log, "postgres")
        sh(
            ["runuser", "-u", "postgres", "--", PG_BIN / "pg_ctl", "-D", self.datadir, "-l", self.log, "-w", "-t",
             "120", "-o", f"-p {self.port} -k {self.socket_dir} {opts}".strip(), "start"],
            timeout=150,
        )  # fmt: skip
        self.work.defer(self.stop)

    def running(self) -> bool:
        proc = sh(["runuser", "-u", "postgres", "--", PG_BIN / "pg_ctl", "-D", self.datadir, "status"], check=False)
        return proc.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists() or not self.running():
            return
        pg_ctl = ["runuser", "-u", "postgres", "--", PG_BIN / "pg_ctl", "-D", self.datadir, "-w", "-t", "60"]
        if sh([*pg_ctl, "-m", mode, "stop"], check=False, timeout=90).returncode != 0:
            sh([*pg_ctl, "-m", "immediate", "stop"], check=False, timeout=90)

    def psql_argv(self, db: str = "postgres") -> list[str]:
        return ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                "-p", str(self.port), "-U", "postgres", "-d", db]  # fmt: skip

    def sql(self, sql: str, db: str = "postgres") -> str:
        return sh([*self.psql_argv(db), "-c", sql]).stdout.strip()

    def switch_wal(self, times: int, db: str = "postgres") -> None:
        """Fill a few WAL segments and wait until the archiver has copied them."""
        last = ""
        for i in range(times):
            self.sql(f"CREATE TABLE IF NOT EXISTS filler(x int); INSERT INTO filler VALUES ({i})", db)
            last = self.sql("SELECT pg_walfile_name(pg_switch_wal())", db)
        self.wait_archived(last)

    def wait_archived(self, segment: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        done = ""
        while time.monotonic() < deadline:
            done = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            if done >= segment:
                return
            time.sleep(0.1)
        raise AssertionError(f"WAL {segment} was not archived in time (last archived: {done or 'none'})")

    def wal_segments(self) -> set[str]:
        """WAL segment files (24 hex digits) in the archive."""
        return {p.name for p in self.archive.iterdir() if len(p.name) == 24 and _hex(p.name)}


def _hex(name: str) -> bool:
    return all(c in "0123456789ABCDEF" for c in name)


# MariaDB ----------------------------------------------------------------------------------


class MariaDB:
    """A MariaDB server run as the mysql user, with binary logs in its data directory."""

    def __init__(self, work: Work, datadir: Path, *, tag: str = "mariadb") -> None:
        self.work = work
        self.datadir = datadir
        self.port = free_port()
        self.socket = work.run_dir / f"{tag}.sock"
        self.pid_file = work.run_dir / f"{tag}.pid"
        self.log = work.run_dir / f"{tag}.err"
        self.proc: subprocess.Popen | None = None

    def install(self) -> None:
        self.datadir.mkdir(parents=True)
        chown(self.datadir, "mysql")
        sh(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=mysql",
             "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
            timeout=180,
        )  # fmt: skip

    def start(self, server_id: int = 1) -> None:
        argv = [
            "mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--user=mysql", f"--pid-file={self.pid_file}",
            f"--log-error={self.log}", "--log-bin=mysql-bin", f"--server-id={server_id}",
            "--innodb-buffer-pool-size=32M", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=1",
            "--sync-binlog=1",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.work.defer(self.stop)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited with {self.proc.returncode}:\n{_tail(self.log)}")
            ping = sh(["mariadb-admin", f"--socket={self.socket}", "-uroot", "ping"], check=False, timeout=10)
            if ping.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"mariadbd did not start:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def client_argv(self, db: str = "") -> list[str]:
        return ["mariadb", "--batch", "--skip-column-names", f"--socket={self.socket}", "-uroot", *([db] if db else [])]

    def sql(self, sql: str, db: str = "") -> list[list[str]]:
        out = sh([*self.client_argv(db), "-e", sql]).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def binlog_files(self) -> set[str]:
        return {p.name for p in self.datadir.iterdir() if p.name.startswith("mysql-bin.") and p.suffix != ".index"}


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


# write load ------------------------------------------------------------------------------


class Load(threading.Thread):
    """Inserts rows one at a time, each committed; records (id, time the commit returned)."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.commits: list[tuple[int, float]] = []
        self.error: str | None = None
        self._stop_flag = threading.Event()

    def insert(self) -> int:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def run(self) -> None:
        try:
            while not self._stop_flag.is_set():
                row_id = self.insert()
                self.commits.append((row_id, time.time()))
        except Exception as exc:  # noqa: BLE001 - reported by stop()
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                self.finish()

    def wait_for(self, rows: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.commits) < rows:
            if self.error or not self.is_alive():
                raise AssertionError(f"write load stopped: {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(f"write load made only {len(self.commits)} commits in {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(60)

    def committed_before(self, moment: float) -> set[int]:
        return {row_id for row_id, at in self.commits if at < moment}


class SessionLoad(Load):
    """A client process (psql, mariadb) fed one INSERT at a time; each answers with the new row's id."""

    def __init__(self, name: str, argv: list[str], statement: str) -> None:
        super().__init__(name)
        self.statement = statement
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )

    def insert(self) -> int:
        self.proc.stdin.write(self.statement)
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("client ended")
        return int(line.strip())

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def stop(self) -> None:
        super().stop()
        if self.is_alive():  # blocked on a server that went away
            self.proc.kill()
            self.join(10)


class SqliteLoad(Load):
    def __init__(self, path: Path) -> None:
        super().__init__("sqlite-load")
        self.path = path

    def run(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        super().run()

    def insert(self) -> int:
        return self.db.execute("INSERT INTO load(v) VALUES ('x')").lastrowid

    def finish(self) -> None:
        self.db.close()


# jobs and events -------------------------------------------------------------------------


def pg_job(work: Work, pg: Postgres, *, logs: str = "truncate", fallback: str = "require", **writer) -> Path:
    pg_writer = {
        "type": "postgresql",
        "host": pg.socket_dir,
        "port": pg.port,
        "user": "postgres",
        "os_user": "postgres",
        "dbname": "app",
        "wal_archive": pg.archive,
        **writer,
    }
    return write_job(
        work.dir / "pg-job.toml",
        name="pgdb",
        sources=[work.image],
        writers=[pg_writer, {"type": "fsfreeze", "mountpoints": [work.disk]}],
        logs=logs,
        fallback=fallback,
        freeze_timeout=20,
    )


def maria_job(work: Work, maria: MariaDB, *, logs: str = "truncate", fallback: str = "require") -> Path:
    return write_job(
        work.dir / "mariadb-job.toml",
        name="mariadb",
        sources=[work.image],
        writers=[
            {"type": "mariadb", "socket": maria.socket, "user": "root"},
            {"type": "fsfreeze", "mountpoints": [work.disk]},
        ],
        logs=logs,
        fallback=fallback,
    )


def events(cli, point: str | None = None) -> list[dict]:
    rows = cli.run("events", "--json", "--limit", "5000", check=True).json()
    return [e for e in rows if point is None or e["restore_point"] == point]


def find_event(evs: list[dict], component: str, phase: str, outcome: str | None = None) -> dict:
    found = [e for e in evs if e["component"] == component and e["phase"] == phase]
    assert found, f"no {component} {phase} event in:\n" + "\n".join(_fmt(e) for e in evs)
    event = found[-1]
    if outcome is not None:
        assert event["outcome"] == outcome, _fmt(event)
    return event


def freeze_moment(evs: list[dict], component: str = "fsfreeze") -> float:
    """When the writer's freeze returned (the catalog records it right after): every earlier commit is in."""
    return utc_timestamp(find_event(evs, component, "freeze", "ok")["time"])


def frozen_window(evs: list[dict]) -> float:
    """Seconds from the first writer's freeze event to the last thaw event."""
    freezes = [utc_timestamp(e["time"]) for e in evs if e["phase"] == "freeze" and e["outcome"] == "ok"]
    thaws = [utc_timestamp(e["time"]) for e in evs if e["phase"] == "thaw" and e["outcome"] == "ok"]
    return max(thaws) - min(freezes)


def _fmt(e: dict) -> str:
    return f"{e['time']} {e['component']} {e['phase']} {e['outcome']} {e['message']}"
