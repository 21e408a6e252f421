#!/usr/bin/env python3
"""Sequential read throughput through `surepoint mount`, next to reading the same image from a local file.

    uv run python bench/mount_read.py [--size 1G] [--workdir /var/tmp/surepoint-mount-bench]

As root (the page cache is dropped between runs). For each repository kind (unencrypted, AES-256-GCM)
it backs up one image, then reads DIR/disks/0-<name>.raw from start to end in 1 MiB reads:

    cold        fresh mount, page cache dropped: every chunk comes from the repository
    cold, no RA the same with --readahead 0 (no background prefetch): what read-ahead buys
    warm        the second read of the same mount (kernel page cache, FUSE keep_cache)
    chunk cache a mount whose chunk cache holds the whole image, read once, page cache dropped, read
                again: decoded chunks come from the LRU cache, only FUSE and copying remain

The local file gets the same cold / warm reads. The image is a mix of incompressible random data,
compressible text and all-zero regions (zero chunks are not stored and cost nothing to read). Results
are printed as a table and written to bench/results/mount-<timestamp>.json. Content is checked once
(BLAKE3 of the mounted image against the file), outside the timed reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

HERE = Path(__file__).resolve().parent
BLOCK = 1 << 20


def surepoint_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("surepoint")
    return [str(exe)] if exe.exists() else ["uv", "run", "surepoint"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def make_image(path: Path, size: int, seed: int = 7) -> None:
    """4 MiB regions cycling random (50%), text (25%) and zeros (25%)."""
    rng = random.Random(seed)
    region = 4 << 20
    line = b"2026-11-25T11:46:34 web01 nginx[812]: GET /index.html 200 5123 0.004\n"
    text = (line * (region // len(line) + 1))[:region]
    with open(path, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate(range(0, size, region)):
            kind = i % 4
            if kind == 3:
                continue
            data = rng.randbytes(region) if kind in (0, 2) else text
            f.seek(offset)
            f.write(data[: size - offset])


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_read(path: Path) -> float:
    """MB/s (10^6 bytes per second) of reading the whole file sequentially."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        start = time.perf_counter()
        while True:
            block = os.read(fd, BLOCK)
            if not block:
                break
            total += len(block)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return total / elapsed / 1e6


def digest(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(BLOCK * 8):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc


def bench_mount(sp: list[str], env: dict, point: str, mnt: Path, extra: list[str]) -> tuple[Path, dict]:
    mnt.mkdir(exist_ok=True)
    state = json.loads(run([*sp, "mount", point, str(mnt), "--images-only", "--json", *extra], env).stdout)
    return Path(state["disks"][0]["image"]), state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--workdir", default="/var/tmp/surepoint-mount-bench")
    ap.add_argument("--encryption", default="none,aes-256-gcm")
    ap.add_argument("--cache-size", default="256M")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the page cache is dropped between reads")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    image = work / f"image-{args.size}.raw"
    if not image.exists() or image.stat().st_size != size:
        print(f"making {image} ...", file=sys.stderr)
        make_image(image, size)
    sp = surepoint_cmd()
    results: dict[str, dict[str, float]] = {}

    drop_caches()
    local = {"cold": timed_read(image), "warm": timed_read(image)}
    results["local file"] = local
    reference = digest(image)

    for encryption in args.encryption.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"run-{encryption}-", dir=work))
        env = dict(
            os.environ,
            SUREPOINT_REPO=str(tmp / "repo"),
            SUREPOINT_PASSPHRASE="bench passphrase",
            SUREPOINT_CATALOG=str(tmp / "catalog.sqlite"),
            SUREPOINT_MOUNT_STATE_DIR=str(tmp / "state"),
        )
        try:
            run([*sp, "init", "--encryption", encryption], env)
            point = json.loads(run([*sp, "backup", str(image), "--name", "bench", "--json"], env).stdout)["id"]
            row: dict[str, float] = {}
            mnt = tmp / "mnt"
            raw, _ = bench_mount(sp, env, point, mnt, ["--readahead", "0", "--cache-size", args.cache_size])
            drop_caches()
            row["cold, no RA"] = timed_read(raw)
            run([*sp, "umount", str(mnt)], env)

            raw, state = bench_mount(sp, env, point, mnt, ["--cache-size", args.cache_size])
            drop_caches()
            row["cold"] = timed_read(raw)
            row["warm"] = timed_read(raw)
            if digest(raw) != reference:
                raise SystemExit(f"WRONG DATA through the mount ({encryption})")
            run([*sp, "umount", str(mnt)], env)

            # A chunk cache that holds the whole image: fill it, drop the page cache, read again.
            big = str(size + (64 << 20))
            raw, _ = bench_mount(sp, env, point, mnt, ["--cache-size", big])
            timed_read(raw)
            drop_caches()
            row["chunk cache"] = timed_read(raw)
            run([*sp, "umount", str(mnt)], env)
            results[f"mount, {encryption}"] = row
        finally:
            subprocess.run([*sp, "umount", "--all", "--lazy"], env=env, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    columns = ["cold", "cold, no RA", "warm", "chunk cache"]
    print(f"\nsequential read of a {args.size} image, MB/s (1 MiB reads; chunk cache {args.cache_size})\n")
    print(f"{'':24}" + "".join(f"{c:>14}" for c in columns))
    for name, row in results.items():
        print(f"{name:24}" + "".join(f"{row[c]:>14.0f}" if c in row else f"{'-':>14}" for c in columns))
    out = HERE / "results" / f"mount-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"size": size, "cache": args.cache_size, "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
