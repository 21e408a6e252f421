#!/usr/bin/env python3
"""Free-block skipping: a full backup of an image whose filesystem had 30% of its space freed by deleting
files, against a raw read (`cat`), `qemu-img convert` and surepoint reading everything (--no-skip-free).

The image is bench/make_image.py's v1 (ext4, ~61% used); a copy is loop-mounted and files are deleted
until the given share of the filesystem is freed, so the image file still holds the deleted bytes (as a
real disk does). The page cache is dropped before every measured step; the restored image of the
skipping backup must pass e2fsck -fn and hold every remaining file byte for byte (diff -r of both
mounted read-only). Needs root (loop mounts, dropping the page cache).

    uv run python bench/skip_free.py [--size 4G] [--free 0.30] [--workdir /var/tmp/surepoint-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_image as mi  # noqa: E402
from run import resolve_surepoint  # noqa: E402

PASSPHRASE = "bench-passphrase"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fs_used(image: Path) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in sh("dumpe2fs", "-h", str(image)).splitlines() if ":" in line)
    size = int(fields["Block count"]) * int(fields["Block size"])
    return size - int(fields["Free blocks"]) * int(fields["Block size"]), size


def make_freed(v1: Path, share: float, seed: int) -> Path:
    """A copy of v1 with files deleted until `share` of the filesystem's size is free again."""
    out = v1.with_name(v1.stem + f"-freed{int(share * 100)}.img")
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    sh("cp", "--sparse=always", str(v1), str(tmp))
    used_before, size = fs_used(tmp)
    with tempfile.TemporaryDirectory() as mnt:
        sh("mount", "-o", "loop", str(tmp), mnt)
        try:
            files = sorted(p for p in Path(mnt).rglob("*") if p.is_file() and not p.is_symlink())
            random.Random(seed).shuffle(files)
            freed = 0
            for p in files:
                if freed >= share * size:
                    break
                freed += p.stat().st_blocks * 512
                p.unlink()
        finally:
            sh("umount", mnt)
    used_after, _ = fs_used(tmp)
    os.replace(tmp, out)
    mi.log(f"{out}: fs used {used_before / size:.0%} -> {used_after / size:.0%}")
    return out


def timed(argv: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> float:
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env={**os.environ, **(env or {})}, stdout=stdout, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def du(path: Path) -> int:
    return int(sh("du", "-sb", str(path)).split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--free", type=float, default=0.30, help="share of the filesystem freed by deleting files")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default="/var/tmp/surepoint-bench")
    ap.add_argument("--encryption", default="aes-256-gcm")
    ap.add_argument("--surepoint", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: loop mounts and dropping the page cache need it")
    workdir = Path(args.workdir)
    size = mi.parse_size(args.size)
    v1 = mi.make_v1(workdir, size, args.seed)
    image = make_freed(v1, args.free, args.seed)
    used, fs_size = fs_used(image)
    allocated = mi.allocated_bytes(image)
    surepoint = resolve_surepoint(args.surepoint)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t = Path(tmp)
        rows.append(("cat (raw read)", timed(["cat", str(image)]), None))
        rows.append(
            (
                "qemu-img convert -O qcow2",
                timed(["qemu-img", "convert", "-O", "qcow2", str(image), str(t / "q")]),
                du(t / "q"),
            )
        )
        for label, extra in (("surepoint (skips free blocks)", []), ("surepoint --no-skip-free", ["--no-skip-free"])):
            repo = t / ("repo" + str(len(rows)))
            env = {"SUREPOINT_PASSPHRASE": PASSPHRASE, "SUREPOINT_CATALOG": str(t / "catalog.db")}
            sh_env = {**os.environ, **env}
            subprocess.run(
                [*surepoint, "--repo", str(repo), "init", "--encryption", args.encryption],
                env=sh_env,
                check=True,
                capture_output=True,
            )
            argv = [*surepoint, "--repo", str(repo), "backup", str(image), "--name", "bench", *extra]
            rows.append((label, timed(argv, env), du(repo)))
            if not extra:
                restored = t / "restored.img"
                subprocess.run(
                    [*surepoint, "--repo", str(repo), "restore", "bench:latest", "--to", str(restored)],
                    env=sh_env,
                    check=True,
                    capture_output=True,
                )
                check = verify_restore(image, restored)
                restored.unlink()
    cat = rows[0][1]
    print(
        f"\nimage: {size_label(size)} ext4, {used / fs_size:.0%} of the filesystem in use after freeing "
        f"{args.free:.0%}; {allocated >> 20} MiB allocated in the image file; page cache dropped before each step\n"
    )
    print("| tool | time s | MB/s (logical) | x cat | stored MiB |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds, stored in rows:
        print(
            f"| {label} | {seconds:.2f} | {size / seconds / 1e6:.0f} | {seconds / cat:.2f} | "
            f"{'' if stored is None else stored >> 20} |"
        )
    print(f"\nrestore of the skipping backup: {check}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (results / f"skip-free-{stamp}.json").write_text(
        json.dumps(
            {
                "size": size,
                "used": used,
                "fs_size": fs_size,
                "allocated": allocated,
                "free_share": args.free,
                "rows": [{"tool": r[0], "seconds": r[1], "stored": r[2]} for r in rows],
                "restore_check": check,
            },
            indent=2,
        )
    )
    return 0 if check.startswith("ok") else 2


def verify_restore(original: Path, restored: Path) -> str:
    fsck = subprocess.run(["e2fsck", "-fn", str(restored)], capture_output=True, text=True)
    if fsck.returncode != 0:
        return f"FAILED: e2fsck -fn exit {fsck.returncode}"
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        sh("mount", "-o", "loop,ro", str(original), a)
        try:
            sh("mount", "-o", "loop,ro", str(restored), b)
            try:
                diff = subprocess.run(["diff", "-r", "--no-dereference", a, b], capture_output=True, text=True)
            finally:
                sh("umount", b)
        finally:
            sh("umount", a)
    if diff.returncode != 0:
        return "FAILED: files differ: " + diff.stdout[:300]
    return "ok (e2fsck -fn clean, diff -r of every file identical)"


def size_label(n: int) -> str:
    return mi.size_label(n)


if __name__ == "__main__":
    sys.exit(main())
