"""`restore-files --into-vm`: files written back into the running test VM through its guest agent."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import make_ext4, make_staging, needs_root_and_tools

pytestmark = [*needs_root_and_tools(), pytest.mark.kvm, pytest.mark.slow]


def _vm_helpers():
    """The test-VM machinery of tests/vm (loaded by path: its fixtures are not ours to share)."""
    path = Path(__file__).resolve().parents[1] / "vm" / "conftest.py"
    name = "surepoint_test_vm_helpers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mount_test_vm(tmp_path_factory) -> Iterator[object]:
    """A test guest of this module's own (its own QEMU name, so no other test's VM is ever chosen)."""
    helpers = _vm_helpers()
    try:
        helpers.build_test_vm()
    except Exception as exc:  # noqa: BLE001 - no test VM on this machine: skip, as the VM tests do
        pytest.skip(f"test VM not available: {exc}")
    workdir = tmp_path_factory.mktemp("mount-vm")
    cache = helpers.vm_cache()
    disks = {"root": workdir / "root.qcow2", "data": workdir / "data.qcow2"}
    helpers.make_overlay(cache / "root.qcow2", disks["root"])
    helpers.make_overlay(cache / "data.qcow2", disks["data"])
    vm = helpers.TestVm(
        workdir=workdir, accel=helpers.choose_accel(), disks=disks, name=f"surepoint-mount-test-{os.getpid()}"
    )
    try:
        try:
            vm.start(timeout=180 if vm.accel == "kvm" else 600)
        except helpers.KvmCannotBoot:
            vm.stop()
            vm.accel = "tcg"
            vm.start(timeout=600)
        yield vm
    finally:
        vm.stop()


def test_restore_files_into_a_running_vm(mcli, tmp_path, mount_test_vm):
    vm = mount_test_vm
    staging = make_staging(tmp_path / "staging")
    image = tmp_path / "guest.img"
    make_ext4(image, staging)
    mcli.run("init", "--encryption", "none", check=True)
    point = mcli.run("backup", str(image), "--json", check=True).json()["id"]

    result = mcli.run(
        "restore-files",
        point,
        "/dir",
        "/hello.txt",
        "/random.bin",
        "/passwd-link",
        "/private",
        "--into-vm",
        vm.name,
        "--to",
        "/restored",
        "--json",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.json()["target"] == f"VM {vm.name}:/restored"

    def guest(*argv: str) -> str:
        return vm.run(list(argv)).decode()

    assert guest("cat", "/restored/hello.txt") == "hello, world\n"
    want = hashlib.sha256((staging / "random.bin").read_bytes()).hexdigest()
    assert guest("sha256sum", "/restored/random.bin").split()[0] == want
    assert guest("readlink", "/restored/passwd-link").strip() == "/etc/passwd"
    assert guest("stat", "-c", "%a %u %g", "/restored/private").split() == ["600", "1234", "5678"]
    assert guest("stat", "-c", "%a %Y", "/restored/dir/sub/script.sh").split() == ["750", str(1_600_000_000)]
    assert guest("stat", "-c", "%a %u %g", "/restored/dir").split()[1:] == ["4321", "8765"]
    assert guest("cat", "/restored/dir/sub/deeper/leaf.txt") == "leaf\n"

    # A symlinked directory in the guest is not written through; existing files are kept without --overwrite.
    guest("mkdir", "-p", "/tmp/outside", "/restored2")
    guest("ln", "-s", "/tmp/outside", "/restored2/dir")
    refused = mcli.run(
        "restore-files", point, "/dir", "/hello.txt", "--into-vm", vm.name, "--to", "/restored2", timeout=600
    )
    assert refused.returncode == 1 and "symlink" in refused.stderr
    assert guest("ls", "-A", "/tmp/outside") == ""
    again = mcli.run("restore-files", point, "/hello.txt", "--into-vm", vm.name, "--to", "/restored", timeout=600)
    assert again.returncode == 1 and "--overwrite" in again.stderr
