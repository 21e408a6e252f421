#!/usr/bin/env python3
"""Pick the default chunk size: full and incremental backups of the benchmark images at several sizes.

    uv run python bench/chunk_size.py V1.img V2.img [--sizes 256K,1M,4M,16M] [--workdir DIR]

For each chunk size: a full backup of V1 and an incremental of V2 (same name, so V2 reuses V1's
index) into a fresh aes-256-gcm repository; prints time, MB/s, bytes stored by the incremental,
chunk objects, and index bytes per restore point. The page cache is dropped before each backup
when running as root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

from surepoint import storage
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.repository import Repository
from surepoint.sources import FileDiskSource


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def drop_caches() -> None:
    if os.geteuid() == 0:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def backup(repo: Repository, path: str, base=None):
    source = FileDiskSource(path, name="disk")
    try:
        drop_caches()
        started = time.perf_counter()
        point = run_backup(repo, BackupRequest("bench", [source], base=base))
        return point, time.perf_counter() - started
    finally:
        source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("v1")
    parser.add_argument("v2")
    parser.add_argument("--sizes", default="256K,1M,4M,16M")
    parser.add_argument("--workdir", default="/var/tmp/surepoint-chunk-size")
    args = parser.parse_args()
    size = os.path.getsize(args.v1)
    rows = []
    for text in args.sizes.split(","):
        chunk_size = parse_size(text)
        repo_dir = os.path.join(args.workdir, f"repo-{text}")
        shutil.rmtree(repo_dir, ignore_errors=True)
        os.makedirs(args.workdir, exist_ok=True)
        repo = Repository.create(
            storage.open(repo_dir, create=True), encryption="aes-256-gcm", passphrase="bench", chunk_size=chunk_size
        )
        full, full_s = backup(repo, args.v1)
        incr, incr_s = backup(repo, args.v2, base=full)
        objects = sum(1 for _ in repo.backend.list("chunks/"))
        index_bytes = repo.backend.stat(incr.disks[0].index).size
        rows.append(
            (
                text,
                full_s,
                size / full_s / 1e6,
                incr_s,
                incr.disks[0].stored_bytes,
                incr.disks[0].new_chunks,
                full.disks[0].stored_bytes,
                objects,
                index_bytes,
            )
        )
        shutil.rmtree(repo_dir, ignore_errors=True)
    header = (
        "chunk",
        "full s",
        "full MB/s",
        "incr s",
        "incr stored",
        "incr chunks",
        "full stored",
        "objects",
        "index bytes",
    )
    print(" | ".join(header))
    for r in rows:
        print(
            f"{r[0]} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.1f} | {r[4] / 1e6:.1f} MB | {r[5]} | {r[6] / 1e6:.0f} MB"
            f" | {r[7]} | {r[8]}"
        )


if __name__ == "__main__":
    main()
