"""The sync QMP client against a bare QEMU process (-machine none: no guest, no KVM needed)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from surepoint.errors import SurepointError
from surepoint.vm.errors import QmpCommandError, QmpError
from surepoint.vm.qmp import QmpConnection

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is missing")


@pytest.fixture()
def qemu(tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "qmp.sock")
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not Path(sock).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait(10)


def test_execute_and_queries(qemu: str) -> None:
    with QmpConnection(qemu) as qmp:
        assert qmp.execute("query-status")["status"] in ("running", "prelaunch")
        qmp.execute("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
        node = qmp.block_node("n0")
        assert node["drv"] == "null-co"
        assert node["image"]["virtual-size"] == 1 << 20
        assert qmp.query_block() == []  # a node, but no guest device
        assert qmp.query_block_jobs() == []
        qmp.execute("blockdev-del", node_name="n0")
        with pytest.raises(QmpError, match="no block node"):
            qmp.block_node("n0")


def test_command_errors_are_typed(qemu: str) -> None:
    with QmpConnection(qemu) as qmp:
        with pytest.raises(QmpCommandError) as info:
            qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert isinstance(info.value, SurepointError)
        with pytest.raises(QmpCommandError, match="blockdev-del"):
            qmp.execute("blockdev-del", node_name="missing")
        assert qmp.execute("query-status")  # still usable after errors


def test_events(qemu: str) -> None:
    with QmpConnection(qemu) as qmp:
        qmp.execute("stop")
        assert qmp.wait_event("STOP", timeout=10)["event"] == "STOP"


def test_no_socket(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="cannot connect"):
        QmpConnection(str(tmp_path / "absent.sock"), timeout=2)
