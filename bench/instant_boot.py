#!/usr/bin/env python3
"""Time to a working VM: instant recovery from the repository vs a full restore, for the test VM.

    uv run python bench/instant_boot.py [--workdir /var/tmp/surepoint-instant-bench] [--no-drop-caches]

As root. Boots the cached test VM (scripts/build-test-vm, tests/vm/conftest.py), backs it up with
`surepoint backup vm` into a fresh repository, stops it, then in one run:

    instant   `surepoint instant-recover RP`: mount, overlays, boot from the FUSE-served raw images,
              until the guest agent answers (then --migrate-to a local directory, timed, and quit)
    restore   `surepoint vm restore RP --to DIR --start`: every disk restored to local qcow2 first,
              then the same boot from local files, until the guest agent answers

The page cache is dropped before each (the repository is read cold). Times are wall-clock seconds of
the commands; each also reports when its guest agent answered after QEMU started. Results are printed
and written to bench/results/instant-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from surepoint.vm.qmp import QmpConnection  # noqa: E402
from tests.vm.conftest import TestVm, build_test_vm, choose_accel, make_overlay, vm_cache  # noqa: E402


def surepoint_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("surepoint")
    return [str(exe)] if exe.exists() else ["uv", "run", "surepoint"]


def drop_caches(enabled: bool) -> None:
    if enabled:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def run(cmd: list[str], env: dict, timeout: float = 1800) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def quit_vm(qmp_path: str, pid: int | None) -> None:
    with contextlib.suppress(Exception), QmpConnection(qmp_path, timeout=10) as qmp:
        qmp.execute("quit")
    deadline = time.monotonic() + 30
    while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid and os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/var/tmp/surepoint-instant-bench")
    parser.add_argument("--no-drop-caches", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    drop = not args.no_drop_caches
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sp = surepoint_cmd()
    env = dict(
        os.environ,
        SUREPOINT_REPO=str(work / "repo"),
        SUREPOINT_PASSPHRASE="bench passphrase",
        SUREPOINT_CATALOG=str(work / "catalog.sqlite"),
    )
    build_test_vm()
    source = work / "source"
    source.mkdir()
    disks = {"root": source / "root.qcow2", "data": source / "data.qcow2"}
    for name, path in disks.items():
        make_overlay(vm_cache() / f"{name}.qcow2", path)
    vm = TestVm(workdir=source, accel=choose_accel(), disks=disks, name=f"surepoint-bench-{os.getpid()}")
    results: dict = {"host": os.uname().nodename, "accel": vm.accel, "cpus": os.cpu_count()}
    try:
        vm.start(timeout=600)
        results["source_boot_seconds"] = round(vm.boot_seconds, 1)
        print(f"source VM ({vm.accel}) booted in {vm.boot_seconds:.1f} s; backing it up")
        run([*sp, "init"], env)
        seconds, backup = run([*sp, "backup", "vm", vm.name, "--json"], env)
        point = backup["vms"][0]["restore_point"]
        results["backup_seconds"] = round(seconds, 1)
    finally:
        vm.stop()
    sizes = run([*sp, "show", point, "--json"], env)[1]
    results["disks"] = [{"name": d["name"], "size": d["size"]} for d in sizes["disks"]]

    instant_dir = work / "instant"
    drop_caches(drop)
    seconds, session = run([*sp, "instant-recover", point, "--workdir", str(instant_dir), "--json"], env)
    try:
        results["instant"] = {
            "command_seconds": round(seconds, 1),
            "guest_agent_after_start_seconds": session["total_seconds"],
            "qemu_boot_seconds": session["boot_seconds"],
        }
        print(f"instant: guest agent after {session['total_seconds']:.1f} s")
        seconds, _ = run(
            [*sp, "instant-recover", "--workdir", str(instant_dir), "--migrate-to", str(work / "migrated"), "--json"],
            env,
        )
        results["instant"]["migrate_seconds"] = round(seconds, 1)
        print(f"instant: migrated to local qcow2 while running in {seconds:.1f} s")
    finally:
        quit_vm(session["qmp"], session["pid"])
        if not (work / "migrated").exists():
            run([*sp, "instant-recover", "--workdir", str(instant_dir), "--discard"], env)

    restored_dir = work / "restored"
    drop_caches(drop)
    seconds, restored = run([*sp, "vm", "restore", point, "--to", str(restored_dir), "--start", "--json"], env)
    try:
        results["restore"] = {
            "command_seconds": round(seconds, 1),
            "qemu_boot_seconds": round(restored["boot_seconds"], 1),
            "restore_seconds": round(seconds - restored["boot_seconds"], 1),
        }
        print(f"restore + boot: guest agent after {seconds:.1f} s (boot {restored['boot_seconds']:.1f} s)")
    finally:
        quit_vm(str(restored_dir / "qmp.sock"), restored.get("pid"))

    print()
    print(f"{'':28} {'to guest agent':>15} {'of which boot':>14} {'then':>24}")
    i, r = results["instant"], results["restore"]
    print(
        f"{'instant (from repository)':28} {i['command_seconds']:>13.1f} s {i['qemu_boot_seconds']:>12.1f} s "
        f"{'migrate ' + str(i['migrate_seconds']) + ' s':>24}"
    )
    print(f"{'restore, then boot':28} {r['command_seconds']:>13.1f} s {r['qemu_boot_seconds']:>12.1f} s {'-':>24}")
    out = HERE / "results" / f"instant-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
