#!/usr/bin/env python3
"""An incremental VM backup against the full one: the test guest, 2% of its data changed in between.

Boots its own copy of the test VM (overlays of scripts/build-test-vm's images, TCG where KVM cannot
boot it), takes a full backup (`vm backup`, guest frozen through its agent, dirty bitmaps made),
rewrites about `--change` percent of the data the full backup read (random data written over part
of a file in /data, plus a new file), and takes the incremental. Each backup is run `--repeat` times
on a fresh repository and bitmap, the median reported. Prints the wall time of each command, the
bytes read and the ratio incremental / full, then a JSON line. Needs root.

    uv run python bench/vm_incremental.py [--change 2] [--repeat 3] [--surepoint CMD]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.vm.conftest import TestVm, build_test_vm, choose_accel, make_overlay, vm_cache  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from run import resolve_surepoint  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", type=float, default=2.0, help="percent of the full backup's read bytes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--surepoint", help="surepoint command (default: the project venv's surepoint, else uv run)")
    args = parser.parse_args()
    surepoint = resolve_surepoint(args.surepoint)
    build_test_vm()
    work = Path(tempfile.mkdtemp(prefix="surepoint-vmincr-", dir="/var/tmp"))
    disks = {"root": work / "root.qcow2", "data": work / "data.qcow2"}
    for name, path in disks.items():
        make_overlay(vm_cache() / f"{name}.qcow2", path)
    vm = TestVm(workdir=work, accel=choose_accel(), disks=disks, name=f"surepoint-vmincr-{os.getpid()}")
    vm.start(timeout=600)
    print(f"VM ({vm.accel}) ready after {vm.boot_seconds:.0f} s", flush=True)
    # a file the change rewrites in place: 64 MiB of data already there at the full backup
    vm.run(["sh", "-c", "dd if=/dev/urandom of=/data/bench.bin bs=1M count=64 status=none && sync"], timeout=300)
    fulls, incrs, reads = [], [], []
    try:
        for round_number in range(args.repeat):
            repo = work / f"repo{round_number}"
            env = {
                **os.environ,
                "SUREPOINT_REPO": str(repo),
                "SUREPOINT_PASSPHRASE": "bench",
                "SUREPOINT_CATALOG": str(work / f"catalog{round_number}.sqlite"),
                "SUREPOINT_KNOWN_REPOSITORIES": str(work / "known.json"),
            }
            subprocess.run([*surepoint, "init"], env=env, check=True, capture_output=True)

            def backup(*extra: str, env: dict = env) -> tuple[float, dict]:
                started = time.monotonic()
                proc = subprocess.run(
                    [*surepoint, "backup", "vm", vm.name, "--json", *extra], env=env, capture_output=True, text=True
                )
                seconds = time.monotonic() - started
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                return seconds, json.loads(proc.stdout)["vms"][0]

            subprocess.run(["sync"], check=True)
            full_s, full = backup("--full")
            change = int(full["read_bytes"] * args.change / 100)
            inplace = min(change // 2, 64 * MiB) // MiB
            new = max(1, (change - inplace * MiB) // MiB)
            vm.run(
                ["sh", "-c", f"dd if=/dev/urandom of=/data/bench.bin bs=1M count={inplace} seek={round_number * 3} "
                 f"conv=notrunc status=none && dd if=/dev/urandom of=/data/new{round_number}.bin bs=1M count={new} "
                 "status=none && sync"],
                timeout=300,
            )  # fmt: skip
            incr_s, incr = backup()
            if incr.get("cbt") != "dirty bitmap":
                raise RuntimeError(f"the incremental did not use the dirty bitmap: {incr}")
            fulls.append(full_s)
            incrs.append(incr_s)
            reads.append((full["read_bytes"], incr["read_bytes"], (inplace + new) * MiB))
            print(
                f"round {round_number + 1}: full {full_s:.1f} s (read {full['read_bytes'] / MiB:.0f} MiB), "
                f"changed {inplace + new} MiB, incremental {incr_s:.1f} s (read {incr['read_bytes'] / MiB:.0f} MiB), "
                f"incremental / full {incr_s / full_s:.2f}",
                flush=True,
            )
            shutil.rmtree(repo, ignore_errors=True)
            vm.run(["sh", "-c", f"rm -f /data/new{round_number}.bin && sync"])
            with vm.qmp() as qmp:  # the next round starts without this round's bitmaps
                for node in qmp.query_named_block_nodes():
                    for bitmap in node.get("dirty-bitmaps", []):
                        if node["node-name"] in vm.disks and bitmap.get("name", "").startswith("surepoint-"):
                            qmp.execute("block-dirty-bitmap-remove", node=node["node-name"], name=bitmap["name"])
    finally:
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    full_s, incr_s = statistics.median(fulls), statistics.median(incrs)
    summary = {
        "accel": vm.accel,
        "full_seconds": round(full_s, 2),
        "incremental_seconds": round(incr_s, 2),
        "ratio": round(incr_s / full_s, 3),
        "rounds": [
            {"full_s": round(f, 2), "incr_s": round(i, 2), "full_read": r[0], "incr_read": r[1], "changed": r[2]}
            for f, i, r in zip(fulls, incrs, reads, strict=True)
        ],  # fmt: skip
    }
    print(f"median: full {full_s:.1f} s, incremental {incr_s:.1f} s, ratio {incr_s / full_s:.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
