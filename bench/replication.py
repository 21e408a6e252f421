#!/usr/bin/env python3
"""Replication cycle time and bytes after N MiB of guest writes (the RPO a replication interval buys).

    uv run python bench/replication.py [--mib 0,16,64,256] [--workdir /var/tmp/surepoint-repl-bench] [--ssh]

As root. Boots the cached test VM (scripts/build-test-vm, tests/vm/conftest.py), makes a first
(full) replica with `surepoint replicate vm`, then for each N: the guest writes N MiB of random
data to /root/bench.bin (dd, fsync; the file is rewritten each time), and one cycle is timed; last,
one checksum-compare cycle (--full). With --ssh, the cycles go to ssh://root@127.0.0.1:PORT/...,
a private sshd on a free port (tests/remote/sshd.py).
Results are printed and written to bench/results/replication-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.vm.conftest import TestVm, build_test_vm, choose_accel, make_overlay, vm_cache  # noqa: E402

MiB = 1 << 20


def surepoint_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("surepoint")
    return [str(exe)] if exe.exists() else ["uv", "run", "surepoint"]


def cycle(vm: TestVm, target: str, extra: list[str]) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run(
        [*surepoint_cmd(), "replicate", "vm", vm.name, "--to", target, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=3600,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"replicate failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, json.loads(proc.stdout)["vms"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", default="0,16,64,256", help="guest writes before each cycle, in MiB")
    parser.add_argument("--workdir", default="/var/tmp/surepoint-repl-bench")
    parser.add_argument("--ssh", action="store_true", help="replicate to ssh://root@127.0.0.1/WORKDIR/site")
    args = parser.parse_args()
    sizes = [int(x) for x in args.mib.split(",") if x.strip()]

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "vm").mkdir(parents=True)
    build_test_vm()
    disks = {"root": work / "vm" / "root.qcow2", "data": work / "vm" / "data.qcow2"}
    for name, path in disks.items():
        make_overlay(vm_cache() / f"{name}.qcow2", path)
    vm = TestVm(workdir=work / "vm", accel=choose_accel(), disks=disks, name=f"surepoint-repl-bench-{os.getpid()}")
    site = str(work / "site")
    target = site
    sshd = None
    if args.ssh:
        from tests.remote.sshd import start_sshd

        server, sshd = start_sshd(work / "sshd")
        os.environ.update(server.env())
        target = server.url(site)
    results: dict = {"target": "ssh" if args.ssh else "local", "accel": vm.accel, "cycles": []}
    vm.start(timeout=600)
    try:
        seconds, first = cycle(vm, target, [])
        results["first"] = {"seconds": round(seconds, 2), **first}
        print(f"first cycle: {seconds:.1f} s, sent {first['sent_bytes'] / MiB:.0f} MiB")
        for mib in sizes:
            if mib:
                vm.run(
                    ["dd", "if=/dev/urandom", "of=/root/bench.bin", "bs=1M", f"count={mib}", "conv=fsync"],
                    timeout=600,
                )
            seconds, result = cycle(vm, target, [])
            row = {"written_mib": mib, "seconds": round(seconds, 2), **result}
            results["cycles"].append(row)
            print(
                f"after {mib:4d} MiB written: cycle {seconds:6.1f} s ({result['cbt']}), "
                f"sent {result['sent_bytes'] / MiB:8.1f} MiB, frozen {result['freeze_seconds']:.3f} s"
            )
        seconds, compare = cycle(vm, target, ["--full"])
        results["checksum_compare"] = {"seconds": round(seconds, 2), **compare}
        print(f"checksum-compare cycle: {seconds:.1f} s, sent {compare['sent_bytes'] / MiB:.1f} MiB")
    finally:
        vm.stop()
        if sshd is not None:
            from tests.remote.sshd import stop_sshd

            stop_sshd(sshd)
    out = HERE / "results" / f"replication-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
