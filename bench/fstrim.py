#!/usr/bin/env python3
"""What `--fstrim` gains: full backups of the test guest with a deleted 400 MiB file, with and without
asking the guest to trim first, with and without free-block skipping.

Boots its own copy of the test VM (overlays of scripts/build-test-vm's images, TCG where KVM cannot
boot it) with `discard=unmap` on both disks, so the guest's trims reach the qcow2 images. Needs root.

    uv run python bench/fstrim.py [--deleted-mib 400]
"""

from __future__ import annotations

import argparse
import json
import os
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


class DiscardVm(TestVm):
    """The test VM with the guest's discards passed to its qcow2 images."""

    __test__ = False

    def command(self) -> list[str]:
        return [
            arg.replace("driver=qcow2,", "driver=qcow2,discard=unmap,", 1) if arg.startswith("driver=qcow2,") else arg
            for arg in super().command()
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deleted-mib", type=int, default=400)
    args = parser.parse_args()
    surepoint = resolve_surepoint(None)
    build_test_vm()
    work = Path(tempfile.mkdtemp(prefix="surepoint-fstrim-", dir="/var/tmp"))
    disks = {"root": work / "root.qcow2", "data": work / "data.qcow2"}
    for name, path in disks.items():
        make_overlay(vm_cache() / f"{name}.qcow2", path)
    vm = DiscardVm(workdir=work, accel=choose_accel(), disks=disks, name=f"surepoint-fstrim-{os.getpid()}")
    env = {
        **os.environ,
        "SUREPOINT_REPO": str(work / "repo"),
        "SUREPOINT_PASSPHRASE": "bench",
        "SUREPOINT_CATALOG": str(work / "catalog.sqlite"),
        "SUREPOINT_KNOWN_REPOSITORIES": str(work / "known.json"),
    }
    rows = []
    try:
        vm.start(timeout=600)
        print(f"VM ({vm.accel}) ready after {vm.boot_seconds:.0f} s", flush=True)
        subprocess.run([*surepoint, "init"], env=env, check=True, capture_output=True)

        def make_garbage() -> None:
            script = f"dd if=/dev/urandom of=/var/tmp/garbage bs=1M count={args.deleted_mib} status=none && sync"
            vm.run(["sh", "-c", script + " && rm /var/tmp/garbage && sync"], timeout=900)

        def backup(label: str, *extra: str) -> None:
            started = time.monotonic()
            proc = subprocess.run(
                [*surepoint, "backup", "vm", vm.name, "--full", "--json", *extra],
                env=env,
                capture_output=True,
                text=True,
            )
            seconds = time.monotonic() - started
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            result = json.loads(proc.stdout)["vms"][0]
            allocated = {p.name: os.stat(p).st_blocks * 512 for p in disks.values()}
            rows.append((label, seconds, result["read_bytes"], sum(allocated.values())))
            print(f"{label}: {seconds:.1f} s, read {result['read_bytes'] / 2**20:.0f} MiB", flush=True)

        make_garbage()
        backup("skip free, no trim")
        backup("read all allocated (--no-skip-free), no trim", "--no-skip-free")
        backup("--no-skip-free --fstrim", "--no-skip-free", "--fstrim")
        make_garbage()
        backup("skip free, --fstrim", "--fstrim")
    finally:
        vm.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"\n{args.deleted_mib} MiB written and deleted in the guest before each pair; full backups, TCG guest")
    print("| backup | time s | read MiB | overlays allocated MiB after |\n|---|---|---|---|")
    for label, seconds, read, allocated in rows:
        print(f"| {label} | {seconds:.1f} | {read / 2**20:.0f} | {allocated / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
