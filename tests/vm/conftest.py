"""Fixtures for the VM tests: the cached Debian 12 test guest (scripts/build-test-vm), booted once.

The guest boots from qcow2 overlays on the cached images, so the cache stays pristine and the
overlays can hold persistent dirty bitmaps. KVM is used when it can boot a stock kernel; otherwise
(no /dev/kvm, or a paravirtual-only KVM such as kvm_pvm) TCG.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.qmp import QmpConnection

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-test-vm"
TEST_VM_MAC = "52:54:00:5e:10:01"
KVM_FIRST_OUTPUT_SECONDS = 20.0  # a KVM that cannot run the guest shows nothing on the console


def vm_cache() -> Path:
    return Path(os.environ.get("SUREPOINT_VM_CACHE", "/var/cache/surepoint/test-vm"))


def choose_accel() -> str:
    """kvm when it can run a stock guest kernel, else tcg (SUREPOINT_VM_ACCEL overrides)."""
    forced = os.environ.get("SUREPOINT_VM_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    if os.path.exists("/sys/module/kvm_pvm"):  # PVM runs only PVM-enabled guest kernels
        return "tcg"
    return "kvm"


@dataclass
class TestVm:
    """A running test guest: its QMP and guest-agent sockets, console log and disks."""

    __test__ = False  # not a test class, despite the name

    workdir: Path
    accel: str
    proc: subprocess.Popen | None = None
    boot_seconds: float = 0.0
    disks: dict[str, Path] = field(default_factory=dict)
    name: str = "surepoint-test"  # QEMU -name: how `surepoint backup vm NAME` finds it

    @property
    def qmp_path(self) -> str:
        return str(self.workdir / "qmp.sock")

    @property
    def qga_path(self) -> str:
        return str(self.workdir / "qga.sock")

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def qmp(self) -> QmpConnection:
        return QmpConnection(self.qmp_path)

    def agent(self, timeout: float = 30.0) -> GuestAgent:
        return GuestAgent(self.qga_path, timeout=timeout)

    def run(self, argv: list[str], timeout: float = 120.0) -> bytes:
        """Run a program in the guest on a connection of its own (closed at once: the agent's channel
        takes one client at a time, and the backup under test needs it); its stdout, or raise."""
        with self.agent(timeout=max(30.0, timeout)) as ga:
            return ga.exec(argv, timeout=timeout, check=True).stdout

    def command(self) -> list[str]:
        cache = vm_cache()
        cmd = [
            "qemu-system-x86_64",
            "-name",
            self.name,
            "-machine",
            "q35",
            "-accel",
            self.accel,
            "-m",
            "1024",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
            str(cache / "vmlinuz"),
            "-initrd",
            str(cache / "initrd.img"),
            "-append",
            "root=/dev/vda rw console=ttyS0 panic=-1 no_timer_check",
            "-no-reboot",
            # a network card on QEMU's user-mode network: the guest's "production" network, where
            # 10.0.2.2 is this host (how the recovery-lab tests show what a guest outside the lab reaches)
            "-netdev",
            "user,id=net0",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={TEST_VM_MAC},addr=0x3",
            "-serial",
            f"file:{self.console}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev",
            f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vserial0",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        for slot, (node, path) in enumerate(self.disks.items(), start=4):
            cmd += [
                "-blockdev",
                f"driver=qcow2,node-name={node},file.driver=file,file.filename={path}",
                "-device",
                f"virtio-blk-pci,drive={node},id={node}-dev,addr={slot:#x}",
            ]
        return cmd

    def start(self, timeout: float) -> None:
        """Boot and wait until the guest agent answers; sets boot_seconds."""
        for name in ("qmp.sock", "qga.sock", "console.log"):
            (self.workdir / name).unlink(missing_ok=True)
        started = time.monotonic()
        with open(self.workdir / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self._tail()}")
            if (
                self.accel == "kvm"
                and time.monotonic() - started > KVM_FIRST_OUTPUT_SECONDS
                and b"Linux version" not in self._console_bytes()
            ):
                raise KvmCannotBoot("no kernel output under KVM")
            if os.path.exists(self.qga_path):
                try:
                    with GuestAgent(self.qga_path, timeout=2.0, sync_timeout=1.0) as agent:
                        agent.ping()
                    self.boot_seconds = time.monotonic() - started
                    return
                except GuestAgentError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest agent not ready after {timeout:g} s: {self._tail()}")
            time.sleep(0.5)

    def _console_bytes(self) -> bytes:
        try:
            return self.console.read_bytes()
        except FileNotFoundError:
            return b""

    def _tail(self) -> str:
        text = self._console_bytes().decode(errors="replace")
        qemu_log = self.workdir / "qemu.log"
        extra = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
        return (extra + "\n" + text)[-2000:]

    def stop(self) -> None:
        """Quit QEMU through QMP; kill it if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with QmpConnection(self.qmp_path, timeout=5) as qmp:
                qmp.execute("quit")
        except Exception:  # noqa: BLE001 - best effort, killed below
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class KvmCannotBoot(RuntimeError):
    pass


def build_test_vm() -> None:
    """Run scripts/build-test-vm (a no-op when the cache is complete)."""
    subprocess.run([str(BUILD_SCRIPT)], check=True, stdin=subprocess.DEVNULL, timeout=1800)


def make_overlay(base: Path, overlay: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def test_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestVm]:
    """The test guest, booted once per session (root disk /dev/vda, data disk /dev/vdb at /data)."""
    if shutil.which("qemu-system-x86_64") is None and os.geteuid() != 0:
        pytest.skip("qemu-system-x86_64 missing and not root to install it")
    build_test_vm()
    workdir = tmp_path_factory.mktemp("vm")
    cache = vm_cache()
    disks = {"root": workdir / "root.qcow2", "data": workdir / "data.qcow2"}
    make_overlay(cache / "root.qcow2", disks["root"])
    make_overlay(cache / "data.qcow2", disks["data"])
    # a name of its own, so that `surepoint backup vm NAME` never finds a test VM of another session
    vm = TestVm(workdir=workdir, accel=choose_accel(), disks=disks, name=f"surepoint-test-{os.getpid()}")
    try:
        try:
            vm.start(timeout=180 if vm.accel == "kvm" else 600)
        except KvmCannotBoot:
            vm.stop()
            vm.accel = "tcg"
            vm.start(timeout=600)
        print(f"\ntest VM ({vm.accel}) ready after {vm.boot_seconds:.1f} s")
        yield vm
    finally:
        vm.stop()


@pytest.fixture()
def agent(test_vm: TestVm) -> Iterator[GuestAgent]:
    with test_vm.agent() as ga:
        yield ga


@pytest.fixture()
def qmp(test_vm: TestVm) -> Iterator[QmpConnection]:
    with test_vm.qmp() as conn:
        yield conn


@pytest.fixture()
def no_surepoint_bitmaps(test_vm: TestVm) -> Iterator[None]:
    """After the test, remove the dirty bitmaps `surepoint backup vm` left on the test VM's disks, so
    that the tests that look at the disks' bitmaps do not depend on which test ran before."""
    yield
    with test_vm.qmp() as conn:
        for node in conn.query_named_block_nodes():
            for bitmap in node.get("dirty-bitmaps", []):
                if node["node-name"] in test_vm.disks and bitmap.get("name", "").startswith("surepoint-"):
                    conn.execute("block-dirty-bitmap-remove", node=node["node-name"], name=bitmap["name"])
