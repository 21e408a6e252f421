#!/usr/bin/env python3
"""Side-by-side benchmark of surepoint against restic, borg, qemu-img and plain reads/copies.

For every tool: FULL backup of disk image v1, INCREMENTAL backup of v2 into the same repository (same source
path, so the tool finds its base), RESTORE of v2 to a file, and a sha256 check of the restored file against v2.
The page cache is dropped before every measured step.  See bench/README.md.

    uv run python bench/run.py [--size 4G] [--workdir /var/tmp/surepoint-bench] [--only restic,borg] [--keep]

Standard library only; uses `rich` for the tables when it is importable.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
mi = importlib.import_module("make_image")

PASSPHRASE = "surepoint-bench-passphrase"  # not a secret: throwaway repositories
MB = 1_000_000  # MB/s columns are 10^6 bytes per second
MIB = 1 << 20
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Dirs:
    base: Path
    src: Path  # the one source path both backups read (a hard link to v1, then to v2)
    repo: Path
    cache: Path
    restore_dir: Path
    out: Path


@dataclass
class Cmd:
    argv: list[str]
    cwd: Path | None = None
    devnull_stdout: bool = False


@dataclass
class StepResult:
    tool: str
    step: str  # full | incr | restore
    status: str  # ok | failed | n/a | unavailable | MISMATCH
    note: str = ""
    incremental: bool = True  # False: the "incr" step is a full copy (tool has no incremental)
    seconds: float | None = None  # tool wall time + the sync right after it
    tool_seconds: float | None = None
    sync_seconds: float | None = None
    cpu_user: float | None = None
    cpu_sys: float | None = None
    peak_rss_kib: int | None = None
    repo_bytes: int | None = None  # du -sb (apparent size)
    repo_alloc_bytes: int | None = None  # du -sB1 (allocated on disk)
    cache_bytes: int | None = None
    mbps_logical: float | None = None
    mbps_data: float | None = None
    restored_sha256_ok: bool | None = None
    restored_allocated_bytes: int | None = None
    exit_code: int | None = None
    seconds_range: str = ""  # "min-max" over rounds when --repeat > 1
    loadavg_before: float | None = None  # 1-minute load average just before the step (other load = noise)
    round: int = 1
    error: str = ""
    log: str = ""


class Tool:
    name = ""
    description = ""
    encrypted = False
    compression = "none"
    has_incremental = True
    has_repo = True
    init_creates_repo = False  # the tool's own init makes the repository directory

    def env(self, d: Dirs) -> dict[str, str]:
        return {}

    def unavailable(self) -> str | None:
        """None if the tool can run, else the reason it cannot."""
        return None

    def version(self) -> str:
        return ""

    def setup(self, d: Dirs) -> list[Cmd]:
        return []

    def full(self, d: Dirs) -> Cmd | None:
        raise NotImplementedError

    def incr(self, d: Dirs) -> Cmd | None:
        raise NotImplementedError

    def restore(self, d: Dirs) -> Cmd | None:
        return None

    def after_restore(self, d: Dirs) -> None:
        """Move what the restore produced to d.out (untimed)."""


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else ""
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def _move_single_file(src_dir: Path, out: Path) -> None:
    files = [p for p in src_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    if len(files) != 1:
        raise RuntimeError(f"expected one restored file under {src_dir}, found {len(files)}")
    os.replace(files[0], out)


class Surepoint(Tool):
    def __init__(self, encryption: str, cmd: list[str]) -> None:
        self.encryption = encryption
        self.cmd = cmd
        self.name = "surepoint" if encryption != "none" else "surepoint-noenc"
        self.encrypted = encryption != "none"
        self.compression = "surepoint default (zstd level 3, 1 MiB fixed chunks)"
        self.init_creates_repo = True
        self.description = f"surepoint, --encryption {encryption}"

    def env(self, d: Dirs) -> dict[str, str]:
        # --repo is also passed on every command line; the catalog goes into the tool's scratch dir
        return {
            "SUREPOINT_PASSPHRASE": PASSPHRASE,
            "SUREPOINT_REPO": str(d.repo),
            "SUREPOINT_CATALOG": str(d.cache / "catalog.db"),
        }

    def unavailable(self) -> str | None:
        try:
            p = subprocess.run([*self.cmd, "--help"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{shlex.join(self.cmd)} --help: {e}"
        out = p.stdout + p.stderr
        if p.returncode != 0 or not all(w in out for w in ("init", "backup", "restore")):
            tail = " | ".join(out.strip().splitlines()[-3:])
            return f"`{shlex.join(self.cmd)} --help` exit {p.returncode}: {tail[:300]}"
        return None

    def version(self) -> str:
        return _first_line([*self.cmd, "version"])

    # `--repo` is a global option of the surepoint CLI (before the command)
    def setup(self, d: Dirs) -> list[Cmd]:
        return [Cmd([*self.cmd, "--repo", str(d.repo), "init", "--encryption", self.encryption])]

    def full(self, d: Dirs) -> Cmd:
        # --no-skip-free: every byte, so the restore can be checked bit for bit (bench/skip_free.py measures skipping)
        return Cmd([*self.cmd, "--repo", str(d.repo), "backup", str(d.src), "--name", "bench", "--no-skip-free"])

    incr = full

    def restore(self, d: Dirs) -> Cmd:
        return Cmd([*self.cmd, "--repo", str(d.repo), "restore", "bench:latest", "--to", str(d.out)])


class Restic(Tool):
    name = "restic"
    description = "restic, repo v2, AES-256-CTR+Poly1305, content-defined chunks"
    encrypted = True
    compression = "auto (zstd default level ~ 3)"
    init_creates_repo = True

    def env(self, d: Dirs) -> dict[str, str]:
        return {"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_CACHE_DIR": str(d.cache), "RESTIC_REPOSITORY": str(d.repo)}

    def unavailable(self) -> str | None:
        return None if shutil.which("restic") else "restic not installed"

    def version(self) -> str:
        return _first_line(["restic", "version"])

    def setup(self, d: Dirs) -> list[Cmd]:
        return [Cmd(["restic", "init", "--repository-version", "2"])]

    def full(self, d: Dirs) -> Cmd:
        return Cmd(["restic", "backup", "--host", "bench", str(d.src)])

    incr = full

    def restore(self, d: Dirs) -> Cmd:
        return Cmd(["restic", "restore", "latest", "--host", "bench", "--target", str(d.restore_dir)])

    def after_restore(self, d: Dirs) -> None:
        _move_single_file(d.restore_dir, d.out)


class Borg(Tool):
    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.name = "borg-fixed" if fixed else "borg"
        self.encrypted = True
        self.compression = "zstd,3"
        self.init_creates_repo = True
        self.description = "borg, repokey (AES-256-CTR+HMAC-SHA256), --compression zstd,3, " + (
            "--chunker-params fixed,1048576 --sparse" if fixed else "default buzhash chunker"
        )

    def env(self, d: Dirs) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": PASSPHRASE,
            "BORG_BASE_DIR": str(d.cache),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def unavailable(self) -> str | None:
        return None if shutil.which("borg") else "borg not installed"

    def version(self) -> str:
        return _first_line(["borg", "--version"])

    def setup(self, d: Dirs) -> list[Cmd]:
        return [Cmd(["borg", "init", "-e", "repokey", str(d.repo)])]

    def _create(self, d: Dirs, archive: str) -> Cmd:
        extra = ["--chunker-params", "fixed,1048576", "--sparse"] if self.fixed else []
        # relative source path: the archive holds "src/disk.img", same for both archives
        return Cmd(
            ["borg", "create", "--compression", "zstd,3", *extra, f"{d.repo}::{archive}", "src/disk.img"], cwd=d.base
        )

    def full(self, d: Dirs) -> Cmd:
        return self._create(d, "v1")

    def incr(self, d: Dirs) -> Cmd:
        return self._create(d, "v2")

    def restore(self, d: Dirs) -> Cmd:
        return Cmd(["borg", "extract", "--sparse", f"{d.repo}::v2"], cwd=d.restore_dir)

    def after_restore(self, d: Dirs) -> None:
        _move_single_file(d.restore_dir, d.out)


class QemuImg(Tool):
    name = "qemu-img"
    description = "qemu-img convert -O qcow2 (uncompressed, unencrypted, sparse-aware); no incremental"
    has_incremental = False

    def unavailable(self) -> str | None:
        return None if shutil.which("qemu-img") else "qemu-img not installed"

    def version(self) -> str:
        return _first_line(["qemu-img", "--version"])

    def full(self, d: Dirs) -> Cmd:
        return Cmd(["qemu-img", "convert", "-O", "qcow2", str(d.src), str(d.repo / "v1.qcow2")])

    def incr(self, d: Dirs) -> Cmd:
        return Cmd(["qemu-img", "convert", "-O", "qcow2", str(d.src), str(d.repo / "v2.qcow2")])

    def restore(self, d: Dirs) -> Cmd:
        return Cmd(["qemu-img", "convert", "-O", "raw", str(d.repo / "v2.qcow2"), str(d.out)])


class CpSparse(Tool):
    name = "cp-sparse"
    description = "cp --sparse=always (plain copy); no incremental"
    has_incremental = False

    def version(self) -> str:
        return _first_line(["cp", "--version"])

    def full(self, d: Dirs) -> Cmd:
        return Cmd(["cp", "--sparse=always", str(d.src), str(d.repo / "v1.img")])

    def incr(self, d: Dirs) -> Cmd:
        return Cmd(["cp", "--sparse=always", str(d.src), str(d.repo / "v2.img")])

    def restore(self, d: Dirs) -> Cmd:
        return Cmd(["cp", "--sparse=always", str(d.repo / "v2.img"), str(d.out)])


class CatRead(Tool):
    name = "cat"
    description = "cat IMAGE > /dev/null: one full read of the file, holes included (floor for a full read)"
    has_repo = False

    def version(self) -> str:
        return _first_line(["cat", "--version"])

    def full(self, d: Dirs) -> Cmd:
        return Cmd(["cat", str(d.src)], devnull_stdout=True)

    incr = full


# ---------------------------------------------------------------------------------------------- running


class Runner:
    def __init__(self, args: argparse.Namespace, v1: Path, v2: Path, rundir: Path) -> None:
        self.args = args
        self.v1, self.v2 = v1, v2
        self.rundir = rundir
        self.size = os.stat(v1).st_size
        self.alloc = {v1: mi.allocated_bytes(v1), v2: mi.allocated_bytes(v2)}
        self.v2_sha = mi.cached_sha256(v2)
        self.caches_dropped = True
        self.results: list[StepResult] = []  # one per tool and step (median round)
        self.all_rounds: list[StepResult] = []
        self.logdir = rundir.parent.parent / "logs" / rundir.name  # survives the run dir's deletion
        self.logdir.mkdir(parents=True, exist_ok=True)

    def drop_caches(self) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            if self.caches_dropped:
                print(f"WARNING: cannot drop the page cache ({e}); results are warm-cache", flush=True)
            self.caches_dropped = False

    def run_cmd(self, cmd: Cmd, env: dict[str, str], logfile: Path, timeout: float | None) -> dict:
        """Run one command; wall time via perf_counter, CPU time and peak RSS of that command alone via
        /usr/bin/time (a child forked straight from this Python process would inherit its RSS high-water
        mark: Linux keeps ru_maxrss across exec)."""
        full_env = dict(os.environ, **env)
        tfile = logfile.with_suffix(".time")
        argv = cmd.argv
        if TIME_BIN:
            argv = [TIME_BIN, "-f", "%M %U %S", "-o", str(tfile), "--", *cmd.argv]
        with open(logfile, "ab") as logf:
            logf.write(f"$ {shlex.join(cmd.argv)}  (cwd={cmd.cwd})\n".encode())
            logf.flush()
            start = logf.tell()
            t0 = time.perf_counter()
            p = subprocess.Popen(
                argv,
                cwd=cmd.cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if cmd.devnull_stdout else logf,
                stderr=logf,
            )
            timer = threading.Timer(timeout, p.kill) if timeout else None
            if timer:
                timer.start()
            _, status, ru = os.wait4(p.pid, 0)
            t1 = time.perf_counter()
            if timer:
                timer.cancel()
            p.returncode = os.waitstatus_to_exitcode(status)
        res = {"rc": p.returncode, "wall": t1 - t0, "user": ru.ru_utime, "sys": ru.ru_stime, "rss": ru.ru_maxrss}
        with open(logfile, "rb") as f:
            f.seek(start)
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
        res["tail"] = " | ".join(lines[-3:])[-400:]
        if TIME_BIN:
            try:
                rss, user, sys_ = tfile.read_text().strip().splitlines()[-1].split()
                res.update(rss=int(rss), user=float(user), sys=float(sys_))
            except (OSError, ValueError, IndexError):
                res.update(rss=None)
        return res

    @staticmethod
    def du(path: Path, flag: str = "-sb") -> int | None:
        if not path.exists():
            return None
        p = subprocess.run(["du", flag, str(path)], capture_output=True, text=True)
        return int(p.stdout.split()[0]) if p.returncode == 0 and p.stdout else None

    @staticmethod
    def link_source(src: Path, image: Path) -> None:
        tmp = src.with_name(src.name + ".new")
        tmp.unlink(missing_ok=True)
        os.link(image, tmp)
        os.replace(tmp, src)

    def run_tool(self, tool: Tool) -> None:
        print(f"\n=== {tool.name}: {tool.description}", flush=True)
        why = tool.unavailable()
        if why:
            print(f"  UNAVAILABLE: {why}", flush=True)
            for step in ("full", "incr", "restore"):
                self.results.append(StepResult(tool.name, step, "unavailable", error=why))
            return
        rounds = []
        for k in range(self.args.repeat):
            if self.args.repeat > 1:
                print(f"  round {k + 1}/{self.args.repeat}", flush=True)
            rounds.append(self.run_round(tool, self.rundir / tool.name / f"round{k + 1}", k + 1))
        if not self.args.keep:
            shutil.rmtree(self.rundir / tool.name, ignore_errors=True)
        self.all_rounds.extend(r for rr in rounds for r in rr)
        # one row per step: the first non-ok round if any (a failure or mismatch must show), else the round with
        # the median time for that step; repository sizes all come from one round (the one with the median total
        # time) so the size columns of a tool stay consistent (restic and borg chunk differently in every repo)
        totals = sorted(rounds, key=lambda rr: sum(r.seconds or 0 for r in rr))
        rep_round = totals[(len(totals) - 1) // 2]
        for i in range(3):
            runs = [rr[i] for rr in rounds]
            bad = [r for r in runs if r.status not in ("ok", "n/a") or r.seconds is None]
            if bad or len(runs) == 1:
                self.results.append(bad[0] if bad else runs[0])
                continue
            med = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
            times = sorted(r.seconds for r in runs)
            self.results.append(
                replace(
                    med,
                    repo_bytes=rep_round[i].repo_bytes,
                    repo_alloc_bytes=rep_round[i].repo_alloc_bytes,
                    cache_bytes=rep_round[i].cache_bytes,
                    seconds_range="-".join(f"{t:.2f}" if t < 10 else f"{t:.1f}" for t in (times[0], times[-1])),
                    note=(med.note + "; " if med.note else "")
                    + f"median of {len(runs)} rounds: {', '.join(f'{t:.2f}' for t in times)} s; sizes from round "
                    f"{rep_round[i].round}",
                )
            )

    def run_round(self, tool: Tool, base: Path, round_no: int) -> list[StepResult]:
        d = Dirs(
            base, base / "src" / "disk.img", base / "repo", base / "cache", base / "restore", base / "restored.img"
        )
        out: list[StepResult] = []
        for p in (d.src.parent, d.cache, d.restore_dir):
            p.mkdir(parents=True, exist_ok=True)
        if not tool.init_creates_repo:
            d.repo.mkdir(parents=True, exist_ok=True)
        env = tool.env(d) | {"XDG_CACHE_HOME": str(d.cache)}
        logfile = self.logdir / f"{tool.name}-round{round_no}.log"
        setup_error = ""
        for c in tool.setup(d):
            r = self.run_cmd(c, env, logfile, self.args.timeout)
            if r["rc"] != 0:
                setup_error = f"setup `{shlex.join(c.argv)}` exit {r['rc']}: {r['tail']}"
                break
        if setup_error:
            print(f"  FAILED in setup: {setup_error}", flush=True)
            return [
                StepResult(tool.name, step, "failed", error=setup_error, log=str(logfile), round=round_no)
                for step in ("full", "incr", "restore")
            ]

        failed = False
        for step, image in (("full", self.v1), ("incr", self.v2), ("restore", self.v2)):
            res = StepResult(tool.name, step, "ok", log=str(logfile), round=round_no)
            out.append(res)
            if step != "restore":
                self.link_source(d.src, image)
            cmd = {"full": tool.full, "incr": tool.incr, "restore": tool.restore}[step](d)
            if step == "incr" and not tool.has_incremental:
                res.incremental = False
                res.status = "n/a"
                res.note = "no incremental: full copy of v2 (made so v2 can be restored)"
            if cmd is None:
                res.status, res.note = "n/a", res.note or f"{tool.name} has no {step}"
                continue
            if failed:
                res.status, res.error = "failed", "skipped: an earlier step failed"
                continue
            self.drop_caches()
            res.loadavg_before = round(os.getloadavg()[0], 2)
            r = self.run_cmd(cmd, env, logfile, self.args.timeout)
            t = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t
            res.exit_code = r["rc"]
            res.tool_seconds, res.sync_seconds = round(r["wall"], 3), round(sync_s, 3)
            res.seconds = round(r["wall"] + sync_s, 3)
            res.cpu_user, res.cpu_sys, res.peak_rss_kib = round(r["user"], 2), round(r["sys"], 2), r["rss"]
            res.mbps_logical = round(self.size / MB / res.seconds, 1)
            res.mbps_data = round(self.alloc[image] / MB / res.seconds, 1)
            if tool.has_repo:
                res.repo_bytes = self.du(d.repo)
                res.repo_alloc_bytes = self.du(d.repo, "-sB1")
                res.cache_bytes = self.du(d.cache)
            if r["rc"] != 0:
                res.status = "failed"
                res.error = f"exit {r['rc']}: {r['tail']}"
                failed = True
            elif step == "restore":
                self.verify(tool, d, res)
            print(f"  {step:8s} {self._fmt_line(res)}", flush=True)
            if res.error:
                print(f"           {res.error}", flush=True)
        if not self.args.keep:
            shutil.rmtree(base, ignore_errors=True)
        return out

    def verify(self, tool: Tool, d: Dirs, res: StepResult) -> None:
        try:
            tool.after_restore(d)
            res.restored_allocated_bytes = mi.allocated_bytes(d.out)
            size = os.stat(d.out).st_size
            ok = size == self.size and mi.sha256_sparse(d.out) == self.v2_sha
            if not ok and self.args.keep:
                print(f"  kept the wrong restore: {d.out}", flush=True)
        except (OSError, RuntimeError) as e:
            res.status, res.error, res.restored_sha256_ok = "MISMATCH", f"restored file unusable: {e}", False
            self.loud(tool, res.error)
            return
        res.restored_sha256_ok = ok
        if not ok:
            res.status = "MISMATCH"
            res.error = (
                f"restored image is {size} bytes, v2 is {self.size}"
                if size != self.size
                else "restored image has the right size but its sha256 differs from v2's"
            )
            self.loud(tool, res.error)
        if not self.args.keep:
            d.out.unlink(missing_ok=True)

    @staticmethod
    def loud(tool: Tool, msg: str) -> None:
        bar = "!" * 78
        print(f"\n{bar}\n!!! RESTORE IS WRONG for {tool.name}: {msg}\n{bar}\n", flush=True)

    @staticmethod
    def _fmt_line(r: StepResult) -> str:
        rss = f"{r.peak_rss_kib / 1024:.0f} MiB" if r.peak_rss_kib else "-"
        repo = f"{r.repo_bytes / MIB:.0f} MiB" if r.repo_bytes is not None else "-"
        return f"{r.seconds:8.2f} s  {r.mbps_logical:8.1f} MB/s  rss {rss:>8s}  repo {repo:>10s}  {r.status}"


# ---------------------------------------------------------------------------------------------- output


def fmt(v: float | int | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def check_cell(r: StepResult) -> str:
    if r.status == "unavailable":
        return "UNAVAILABLE"
    if r.status == "failed":
        return "FAILED"
    if r.status == "MISMATCH":
        return "!! SHA256 MISMATCH !!"
    if r.step == "restore":
        return "sha256 ok" if r.restored_sha256_ok else r.status
    if r.step == "incr" and not r.incremental:
        return "n/a (full copy†)"
    return r.status


def results_table(results: list[StepResult]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "tool",
        "step",
        "time s",
        "range s",
        "MB/s",
        "data MB/s",
        "CPU s",
        "peak RSS MiB",
        "repo MiB",
        "on disk MiB",
        "check",
    ]
    rows = []
    for r in results:
        if r.seconds is None or r.status in ("unavailable", "failed"):
            rows.append([r.tool, r.step, *["-"] * 8, check_cell(r) if r.status != "n/a" else "n/a"])
            continue
        cpu = None if r.cpu_user is None else r.cpu_user + (r.cpu_sys or 0)
        rows.append(
            [
                r.tool,
                r.step,
                fmt(r.seconds, ".2f"),
                r.seconds_range or "-",
                fmt(r.mbps_logical, ".0f"),
                fmt(r.mbps_data, ".0f"),
                fmt(cpu, ".1f"),
                fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / 1024, ".0f"),
                fmt(None if r.repo_bytes is None else r.repo_bytes / MIB, ".1f"),
                fmt(None if r.repo_alloc_bytes is None else r.repo_alloc_bytes / MIB, ".1f"),
                check_cell(r),
            ]
        )
    return headers, rows


def ratio_table(results: list[StepResult]) -> tuple[list[str], list[list[str]]]:
    by = {(r.tool, r.step): r for r in results}
    tools = list(dict.fromkeys(r.tool for r in results))
    mine = [t for t in tools if t.startswith("surepoint")]
    peers = [t for t in tools if not t.startswith("surepoint")]
    headers = [
        "surepoint vs",
        "full time ×",
        "incr time ×",
        "restore time ×",
        "repo after full ×",
        "repo after incr ×",
        "incr growth ×",
    ]

    def good(r: StepResult | None) -> bool:
        return r is not None and r.status == "ok" and r.seconds is not None

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"

    rows = []
    for m in mine:
        for p in peers:
            cells = [f"{m} / {p}"]
            for step in ("full", "incr", "restore"):
                a, b = by.get((m, step)), by.get((p, step))
                ok = good(a) and good(b) and (step != "incr" or b.incremental)
                cells.append(ratio(a.seconds, b.seconds) if ok else "n/a")
            af, bf, ai, bi = by.get((m, "full")), by.get((p, "full")), by.get((m, "incr")), by.get((p, "incr"))
            sizes_ok = all(x is not None and x.repo_bytes is not None and x.status == "ok" for x in (af, bf))
            cells.append(ratio(af.repo_bytes, bf.repo_bytes) if sizes_ok else "n/a")
            incr_ok = sizes_ok and all(
                x is not None and x.repo_bytes is not None and x.status in ("ok", "n/a") for x in (ai, bi)
            )
            cells.append(ratio(ai.repo_bytes, bi.repo_bytes) if incr_ok else "n/a")
            if incr_ok and bi.incremental:
                cells.append(ratio(ai.repo_bytes - af.repo_bytes, bi.repo_bytes - bf.repo_bytes))
            else:
                cells.append("n/a")
            rows.append(cells)
    return headers, rows


def print_table(title: str, headers: list[str], rows: list[list[str]], caption: str = "", left_cols: int = 2) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        print(f"\n{title}")
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(
                "  ".join(
                    c.rjust(w) if i >= left_cols and headers[i] != "check" else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        if caption:
            print(caption)
        return
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < left_cols or h == "check" else "right")
    for r in rows:
        style = "bold red" if "MISMATCH" in r[-1] or "FAILED" in r[-1] else None
        table.add_row(*r, style=style)
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


def max_load(results: list[StepResult]) -> str:
    loads = [r.loadavg_before for r in results if r.loadavg_before is not None]
    return f"{max(loads):.2f}" if loads else "-"


def host_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def resolve_surepoint(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    for cand in (Path(sys.executable).parent / "surepoint", ROOT / ".venv" / "bin" / "surepoint"):
        if cand.exists():
            return [str(cand)]
    found = shutil.which("surepoint")
    return [found] if found else ["uv", "run", "--project", str(ROOT), "surepoint"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="disk image size, e.g. 4G (default) or 512M for a quick run")
    ap.add_argument("--workdir", default=mi.DEFAULT_WORKDIR, help="images, repositories and restores go here")
    ap.add_argument(
        "--only",
        default="",
        help="comma list of tools: surepoint,surepoint-noenc,restic,borg,"
        "borg-fixed,qemu-img,cp-sparse,cat (a prefix like 'borg' or 'surepoint' selects its variants)",
    )
    ap.add_argument("--keep", action="store_true", help="keep repositories and restored images")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--change-mode", choices=("files", "blocks"), default="files", help="how v2 is made")
    ap.add_argument("--surepoint", help="surepoint command (default: the project venv's surepoint, else uv run)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-step timeout in seconds (default 3600)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per tool; the table shows the median (default 1)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args()

    if os.geteuid() != 0:
        print("WARNING: not root: cannot drop caches or loop-mount; results are warm-cache", flush=True)
    if not TIME_BIN:
        print("WARNING: /usr/bin/time missing (apt install time): peak RSS includes this Python process", flush=True)
    size = mi.parse_size(args.size)
    workdir = Path(args.workdir)
    v1, v2 = mi.ensure_images(workdir, size, args.seed, mode=args.change_mode)
    m1, m2 = mi.load_manifest(v1), mi.load_manifest(v2)

    sp = resolve_surepoint(args.surepoint)
    tools: list[Tool] = [
        CatRead(),
        CpSparse(),
        QemuImg(),
        Restic(),
        Borg(False),
        Borg(True),
        Surepoint("aes-256-gcm", sp),
        Surepoint("none", sp),
    ]
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        tools = [t for t in tools if any(t.name == w or t.name.startswith(w + "-") for w in want)]
        if not tools:
            print(f"--only {args.only}: no such tool", file=sys.stderr)
            return 2

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = workdir / "runs" / stamp
    rundir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, v1, v2, rundir)
    print(
        f"\nimage v1: {v1}  logical {size / MB:.0f} MB, allocated {runner.alloc[v1] / MB:.0f} MB, "
        f"fs {m1.get('fs_used_fraction', 0):.0%} used"
    )
    print(
        f"image v2: {v2}  allocated {runner.alloc[v2] / MB:.0f} MB, {m2.get('changed_blocks_4k')} blocks of 4 KiB "
        f"changed ({m2.get('changed_fraction_of_v1_allocated', 0):.2%} of v1's allocated, mode "
        f"{m2.get('change_mode')})"
    )
    print(f"surepoint command: {shlex.join(sp)}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average is {load:.2f} before starting; other work on this machine adds noise")
    print(f"run dir: {rundir}  (deleted per tool unless --keep); logs: {runner.logdir}")

    versions = {}
    for t in tools:
        versions[t.name] = t.version() if not t.unavailable() else "unavailable"
        runner.run_tool(t)

    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)

    cache_note = (
        "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every measured step"
        if runner.caches_dropped
        else "page cache NOT dropped (warm cache)"
    )
    caption = (
        f"time = tool wall clock + the sync after it; MB/s = {size / MB:.0f} MB logical image / time; data MB/s = "
        f"allocated bytes of the source image / time.\n{cache_note}. repo = du -sb (apparent size) after the step, "
        "on disk = du -sB1 (allocated). "
        f"Highest 1-min load average before a step: {max_load(runner.all_rounds)}. "
        "† no incremental: a second full copy of v2, made so v2 can be restored; not used in ratios."
    )
    headers, rows = results_table(runner.results)
    if args.repeat == 1:  # no range column for single rounds
        headers.pop(3)
        for row in rows:
            row.pop(3)
    print_table(
        f"surepoint bench: {mi.size_label(size)} image, {m2.get('changed_fraction_of_v1_allocated', 0):.1%} changed",
        headers,
        rows,
        caption,
    )
    rh, rr = ratio_table(runner.results)
    if rr:
        print_table(
            "surepoint / peer (< 1: surepoint faster or smaller)",
            rh,
            rr,
            "incr growth = repo bytes added by the incremental backup",
            left_cols=1,
        )

    out = {
        "timestamp": stamp,
        "args": vars(args),
        "host": host_info(),
        "caches_dropped": runner.caches_dropped,
        "image": {"size": size, "v1": str(v1), "v2": str(v2), "v1_manifest": m1, "v2_manifest": mi.load_manifest(v2)},
        "tools": {
            t.name: {
                "description": t.description,
                "encrypted": t.encrypted,
                "compression": t.compression,
                "version": versions.get(t.name),
            }
            for t in tools
        },
        "results": [asdict(r) for r in runner.results],
        "all_rounds": [asdict(r) for r in runner.all_rounds],
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nresults: {path}")

    bad = [r for r in runner.results if r.status == "MISMATCH"]
    if bad:
        print("\n" + "!" * 78)
        for r in bad:
            print(f"!!! {r.tool}: RESTORE DOES NOT MATCH v2: {r.error}")
        print("!" * 78)
        return 2
    failed = [r for r in runner.results if r.status in ("failed", "unavailable")]
    if failed:
        print(
            f"\n{len(failed)} step(s) failed or unavailable: "
            + ", ".join(sorted({f"{r.tool}:{r.step}" for r in failed}))
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
