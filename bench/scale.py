#!/usr/bin/env python3
"""Scale: how the times and peak memory of backup, list, verify --sample, forget, gc and mount open
grow with a large thin disk, many restore points, many VMs in one job and many chunks.

    uv run python bench/scale.py [--only disk,points,vms,chunks] [--workdir /var/tmp/surepoint-scale]
        [--disk-sizes 64G,256G,1T] [--data-share 0.02] [--points 50,100,200] [--vms 10,25,50]
        [--chunks 250000,1000000]

Every measured step is the real `surepoint` command under /usr/bin/time (wall seconds, peak RSS).
What is set up without being measured is made fast: a thin disk is a sparse file with 1 MiB data
extents spread evenly (64 distinct random blocks, so the repository stays small while every byte
is still read and hashed); restore points are taken in process; the many-chunk repository is
written by the engine with fsync turned off and one sync at the end; the VMs are QEMU processes
without a guest OS, paused (`-S`), each with a 64 MiB qcow2 disk holding 8 MiB of data. Needs
root for the VMs and mounts. Results: a table per section and bench/results/scale-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import resolve_surepoint  # noqa: E402

PASSPHRASE = "bench-passphrase"
MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Runner:
    """The surepoint command on one repository, each call timed with its peak RSS."""

    def __init__(self, surepoint: list[str], workdir: Path, repo: Path) -> None:
        self.surepoint = surepoint
        self.repo = repo
        self.env = {
            **os.environ,
            "SUREPOINT_REPO": str(repo),
            "SUREPOINT_PASSPHRASE": PASSPHRASE,
            "SUREPOINT_CATALOG": str(workdir / "catalog.sqlite"),
            "SUREPOINT_KNOWN_REPOSITORIES": str(workdir / "known.json"),
            "SUREPOINT_MOUNT_STATE_DIR": str(workdir / "mount-state"),
        }

    def run(self, *args: str, timeout: float = 7200) -> dict:
        with tempfile.NamedTemporaryFile("r") as stats:
            argv = ["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *self.surepoint, *args]
            proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
            fields = stats.read().split()
        if proc.returncode != 0:
            raise RuntimeError(f"surepoint {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        seconds, rss_kib = float(fields[-2]), int(fields[-1])
        return {"seconds": seconds, "rss_mib": round(rss_kib / 1024, 1), "stdout": proc.stdout}


def step(results: list[dict], section: str, scale: str, what: str, measured: dict) -> dict:
    row = {
        "section": section,
        "scale": scale,
        "step": what,
        "seconds": measured["seconds"],
        "rss_mib": measured["rss_mib"],
    }
    results.append(row)
    log(f"{section} {scale}: {what}: {measured['seconds']:.2f} s, {measured['rss_mib']:.0f} MiB")
    return row


def mount_open(runner: Runner, point: str, where: Path) -> dict:
    """`surepoint mount --images-only` until it returns (the FUSE server serves), then umount."""
    where.mkdir(parents=True, exist_ok=True)
    measured = runner.run("mount", point, str(where), "--images-only")
    runner.run("umount", str(where))
    return measured


def init(runner: Runner, *extra: str) -> None:
    shutil.rmtree(runner.repo, ignore_errors=True)
    runner.run("init", "--encryption", "aes-256-gcm", *extra)


# -- a large thin disk ------------------------------------------------------------------------


def thin_disk(path: Path, size: int, share: float) -> int:
    """A sparse file of `size` with `share` of it in 1 MiB data extents spread evenly; returns the data bytes."""
    extents = max(1, int(size * share) // MiB)
    stride = size // extents // MiB * MiB
    rng = random.Random(1)
    pool = [rng.randbytes(MiB) for _ in range(64)]
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(extents):
            os.pwrite(f.fileno(), pool[i % len(pool)], i * stride)
    return extents * MiB


def section_disk(args, surepoint: list[str], results: list[dict]) -> None:
    for text in args.disk_sizes.split(","):
        size = parse_size(text)
        work = args.workdir / f"disk-{text}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        image = work / "thin.img"
        started = time.monotonic()
        data = thin_disk(image, size, args.data_share)
        log(f"thin disk {text}: {data / MiB:.0f} MiB of data written in {time.monotonic() - started:.0f} s")
        runner = Runner(surepoint, work, work / "repo")
        init(runner)
        scale = f"{text} disk, {data / (1 << 30):.1f} GiB data"
        first = step(results, "disk", scale, "backup (full)", runner.run("backup", str(image), "--name", "thin"))
        first["data_mb_s"] = round(data / 1e6 / first["seconds"], 1)
        step(
            results,
            "disk",
            scale,
            "backup (again, no change tracking)",
            runner.run("backup", str(image), "--name", "thin"),
        )
        step(results, "disk", scale, "list", runner.run("list"))
        step(results, "disk", scale, "verify --sample 1", runner.run("verify", "--sample", "1"))
        step(results, "disk", scale, "mount open", mount_open(runner, "thin:latest", work / "mnt"))
        step(results, "disk", scale, "forget 1 point", runner.run("forget", "--keep-last", "1", "--name", "thin"))
        step(results, "disk", scale, "gc", runner.run("gc", "--grace", "0"))
        shutil.rmtree(work, ignore_errors=True)


# -- many restore points of one source ---------------------------------------------------------


def section_points(args, surepoint: list[str], results: list[dict]) -> None:
    from surepoint import storage
    from surepoint.events import EventRecorder
    from surepoint.jobs.file_backup import backup_files
    from surepoint.repo.repository import Repository

    work = args.workdir / "points"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = work / "disk.img"
    rng = random.Random(2)
    with open(image, "wb") as f:
        f.truncate(256 * MiB)
        for i in range(0, 256, 2):
            f.seek(i * MiB)
            f.write(rng.randbytes(MiB // 2) + bytes(MiB // 2))
    runner = Runner(surepoint, work, work / "repo")
    init(runner)
    os.environ.update({k: v for k, v in runner.env.items() if k.startswith("SUREPOINT_")})
    from surepoint.catalog import Catalog

    catalog = Catalog(runner.env["SUREPOINT_CATALOG"])
    made = 0
    for target in sorted(int(n) for n in args.points.split(",")):
        repo = Repository.open(storage.open(str(runner.repo)), lambda: PASSPHRASE)
        started = time.monotonic()
        while made < target - 1:
            with open(image, "r+b") as f:  # 1% of the disk changes between points
                for _ in range(40):
                    f.seek(rng.randrange(0, 256 * MiB - 65536))
                    f.write(rng.randbytes(65536))
            backup_files(repo, EventRecorder(catalog, repo.id), [str(image)], name="disk", skip_free=False)
            made += 1
        log(f"{target - 1} restore points made in process ({time.monotonic() - started:.0f} s for this batch)")
        scale = f"{target} points"
        with open(image, "r+b") as f:
            f.seek(rng.randrange(0, 256 * MiB - 65536))
            f.write(rng.randbytes(65536))
        step(results, "points", scale, "backup", runner.run("backup", str(image), "--name", "disk", "--no-skip-free"))
        made += 1
        step(results, "points", scale, "list", runner.run("list"))
        step(results, "points", scale, "verify --sample 1", runner.run("verify", "--sample", "1"))
        step(results, "points", scale, "mount open", mount_open(runner, "disk:latest", work / "mnt"))
        step(results, "points", scale, f"forget 1 of {target}", runner.run("forget", "--keep-last", str(target - 1)))
        made -= 1
        step(results, "points", scale, "gc", runner.run("gc", "--grace", "0"))
    shutil.rmtree(work, ignore_errors=True)


# -- many VMs in one job ----------------------------------------------------------------------


def start_vm(work: Path, name: str) -> subprocess.Popen:
    disk = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    pattern = int(name.rsplit("-", 1)[-1]) % 250 + 1
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 8M", str(disk)], check=True, capture_output=True
    )
    qmp = work / f"{name}.qmp"
    argv = ["qemu-system-x86_64", "-name", name, "-S", "-nodefaults", "-display", "none", "-machine", "q35",
            "-accel", "tcg", "-m", "64", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}",
            "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not qmp.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def section_vms(args, surepoint: list[str], results: list[dict]) -> None:
    for count in (int(n) for n in args.vms.split(",")):
        work = args.workdir / f"vms-{count}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        names = [f"sp-scale-{os.getpid()}-{i}" for i in range(count)]
        procs = []
        try:
            for name in names:
                procs.append(start_vm(work, name))
            runner = Runner(surepoint, work, work / "repo")
            init(runner)
            scale = f"{count} VMs"
            step(results, "vms", scale, "backup (full)", runner.run("vm", "backup", *names, "--no-quiesce"))
            step(results, "vms", scale, "backup (incremental)", runner.run("vm", "backup", *names, "--no-quiesce"))
            listed = runner.run("list", "--json")
            points = json.loads(listed["stdout"])["restore_points"]
            if len(points) != 2 * count:  # a full and an incremental point per VM
                raise RuntimeError(f"{count} VMs backed up twice, but {len(points)} restore points listed")
            step(results, "vms", scale, "list", listed)
            step(results, "vms", scale, "verify --sample 1", runner.run("verify", "--sample", "1"))
            step(results, "vms", scale, "forget 1 per VM", runner.run("forget", "--keep-last", "1"))
            step(results, "vms", scale, "gc", runner.run("gc", "--grace", "0"))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
            shutil.rmtree(work, ignore_errors=True)


# -- a repository with many chunks --------------------------------------------------------------


class GeneratedSource:
    """A disk of `count` chunks, each different and compressible, made up while it is read."""

    def __init__(self, count: int, chunk_size: int) -> None:
        self.name = "generated"
        self.size = count * chunk_size
        self.chunk_size = chunk_size

    def allocated(self):
        from surepoint.repo.extents import Extent

        return [Extent(0, self.size)]

    def changed(self):
        return None

    def read(self, offset: int, length: int) -> bytes:
        first = offset // self.chunk_size
        return b"".join(
            (first + i).to_bytes(8, "little") * (self.chunk_size // 8) for i in range(length // self.chunk_size)
        )

    def close(self) -> None:
        pass


def section_chunks(args, surepoint: list[str], results: list[dict]) -> None:
    from surepoint import storage
    from surepoint.repo.backup import BackupRequest, run_backup
    from surepoint.repo.repository import Repository

    chunk_size = 64 << 10
    for count in (int(n) for n in args.chunks.split(",")):
        work = args.workdir / f"chunks-{count}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        runner = Runner(surepoint, work, work / "repo")
        init(runner, "--chunk-size", str(chunk_size))
        repo = Repository.open(storage.open(str(runner.repo)), lambda: PASSPHRASE)
        started = time.monotonic()
        real_fsync = os.fsync
        os.fsync = lambda fd: None  # setup only: one sync at the end instead of one per chunk
        try:
            run_backup(repo, BackupRequest(name="generated", sources=[GeneratedSource(count, chunk_size)]))
        finally:
            os.fsync = real_fsync
        os.sync()
        log(f"{count} chunks generated in {time.monotonic() - started:.0f} s")
        image = work / "small.img"
        with open(image, "wb") as f:
            f.write(random.Random(3).randbytes(64 * MiB))
        scale = f"{count} chunks"
        step(
            results,
            "chunks",
            scale,
            "backup (another 64 MiB disk)",
            runner.run("backup", str(image), "--name", "generated"),
        )
        step(results, "chunks", scale, "list", runner.run("list"))
        step(results, "chunks", scale, "verify --sample 1", runner.run("verify", "--sample", "1"))
        big = json.loads(runner.run("list", "--json")["stdout"])["restore_points"][0]["id"]
        step(results, "chunks", scale, "mount open", mount_open(runner, big, work / "mnt"))
        step(results, "chunks", scale, "gc (nothing to remove)", runner.run("gc", "--grace", "0"))
        step(
            results,
            "chunks",
            scale,
            "forget the big point",
            runner.run("forget", "--keep-last", "1", "--name", "generated"),
        )
        step(results, "chunks", scale, f"gc (removes {count} chunks)", runner.run("gc", "--grace", "0"))
        shutil.rmtree(work, ignore_errors=True)


SECTIONS = {"disk": section_disk, "points": section_points, "vms": section_vms, "chunks": section_chunks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/surepoint-scale"))
    parser.add_argument("--disk-sizes", default="64G,256G,1T")
    parser.add_argument("--data-share", type=float, default=0.02)
    parser.add_argument("--points", default="50,100,200")
    parser.add_argument("--vms", default="10,25,50")
    parser.add_argument("--chunks", default="250000,1000000")
    parser.add_argument("--surepoint", default=None, help="surepoint command (default: this venv's)")
    args = parser.parse_args()
    surepoint = resolve_surepoint(args.surepoint)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    loads = [os.getloadavg()[0]]
    try:
        for name in args.only.split(","):
            SECTIONS[name](args, surepoint, results)
            loads.append(os.getloadavg()[0])
    finally:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"cpus": os.cpu_count(), "load": loads, "steps": results}, indent=2))
        print("\n| section | scale | step | time s | peak RSS MiB |\n|---|---|---|---|---|")
        for r in results:
            print(f"| {r['section']} | {r['scale']} | {r['step']} | {r['seconds']:.2f} | {r['rss_mib']:.0f} |")
        print(f"\nload average during the run: {min(loads):.1f} to {max(loads):.1f}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
