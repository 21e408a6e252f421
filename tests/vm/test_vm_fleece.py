"""Point-in-time views of the running test VM's disks, read through the NBD client."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from surepoint.vm.errors import FleeceError
from surepoint.vm.fleece import PointInTimeView
from surepoint.vm.guest_agent import GuestAgent
from surepoint.vm.qmp import QmpConnection

pytestmark = pytest.mark.kvm

MiB = 1 << 20


def copy_out(view: PointInTimeView, disk: str, dest: Path) -> None:
    """Read a whole disk of the view over NBD into a sparse local raw image."""
    source = view.source(disk)
    try:
        with open(dest, "wb") as out:
            out.truncate(source.size)
            for ext in source.allocated():
                for offset in range(ext.offset, ext.end, 8 * MiB):
                    length = min(8 * MiB, ext.end - offset)
                    out.seek(offset)
                    out.write(source.read(offset, length))
    finally:
        source.close()


def debugfs_dump(image: Path, guest_path: str, dest: Path) -> bytes:
    subprocess.run(["debugfs", "-R", f"dump {guest_path} {dest}", str(image)], check=True, capture_output=True)
    return dest.read_bytes()


def first_block(image: Path, guest_path: str) -> tuple[int, int]:
    """The first data block of a file in an ext4 image, and the block size."""
    blocks = subprocess.run(
        ["debugfs", "-R", f"blocks {guest_path}", str(image)], check=True, capture_output=True, text=True
    ).stdout.split()
    header = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True, text=True).stdout
    block_size = next(int(line.split(":")[1]) for line in header.splitlines() if line.startswith("Block size:"))
    return int(blocks[0]), block_size


def bitmaps(qmp: QmpConnection, node: str) -> dict[str, dict]:
    return {b["name"]: b for b in qmp.block_node(node).get("dirty-bitmaps", [])}


def assert_no_leftovers(qmp: QmpConnection) -> None:
    assert qmp.query_block_jobs() == []
    assert qmp.execute("query-block-exports") == []
    assert not [n["node-name"] for n in qmp.query_named_block_nodes() if n["node-name"].startswith("sp-")]


def test_view_is_the_instant_while_the_guest_writes(qmp: QmpConnection, agent: GuestAgent, tmp_path: Path) -> None:
    before = os.urandom(4 * MiB)
    agent.write_file("/data/pattern.bin", before)
    agent.exec(["sync"], check=True)
    # a guest process keeps writing to the same filesystem while the view is made and read
    writer = agent.exec_start(
        [
            "sh",
            "-c",
            "i=0; while [ $i -lt 300 ]; do "
            "dd if=/dev/urandom of=/data/noise.bin bs=64k count=16 conv=notrunc oflag=direct status=none; "
            "i=$((i+1)); done",
        ],
        capture=False,
    )
    try:
        with PointInTimeView(qmp, ["data", "root"], freeze=agent.fsfreeze_freeze, thaw=agent.fsfreeze_thaw) as view:
            assert view.quiesced
            assert agent.fsfreeze_status() == "thawed"
            # after the instant: overwrite the file in place, on the live disk
            agent.exec(
                ["dd", "if=/dev/zero", "of=/data/pattern.bin", "bs=1M", "count=4", "conv=notrunc,fsync", "status=none"],
                check=True,
            )
            live = agent.exec(["sha256sum", "/data/pattern.bin"], check=True).stdout.split()[0]
            assert live == b"bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8"  # 4 MiB zeros

            image = tmp_path / "data-at-instant.raw"
            copy_out(view, "data", image)
            assert debugfs_dump(image, "/pattern.bin", tmp_path / "pattern.bin") == before
            # the file's first block was overwritten in place on the live disk, yet the view has it
            block, block_size = first_block(image, "/pattern.bin")
            with open(image, "rb") as f:
                f.seek(block * block_size)
                assert f.read(block_size) == before[:block_size]
            live_block = agent.exec(
                ["dd", "if=/dev/vdb", f"bs={block_size}", f"skip={block}", "count=1", "iflag=direct", "status=none"],
                check=True,
            ).stdout
            assert live_block == bytes(block_size)
            fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # frozen instant: a clean filesystem

            root = view.source("root")
            try:
                assert root.size == 2048 * MiB
                assert root.read(1024 + 56, 2) == b"\x53\xef"  # the ext4 superblock magic
                assert 100 * MiB < sum(e.length for e in root.allocated()) < 2048 * MiB
            finally:
                root.close()
    finally:
        agent.exec(["kill", str(writer)])
    assert_no_leftovers(qmp)
    assert not view.disks or not any(Path(d.image).exists() for d in view.disks)


def test_dirty_bitmap_tracks_changed_blocks(qmp: QmpConnection, agent: GuestAgent) -> None:
    hooks = {"freeze": agent.fsfreeze_freeze, "thaw": agent.fsfreeze_thaw}
    try:
        with PointInTimeView(qmp, ["data", "root"], new_bitmap="sp-test-1", **hooks) as view:
            assert view.source("data").changed() is None  # first (full) backup: nothing to compare
        assert "sp-test-1" in bitmaps(qmp, "data")
        assert bitmaps(qmp, "data")["sp-test-1"]["persistent"]  # qcow2 overlays store bitmaps

        agent.exec(
            ["dd", "if=/dev/urandom", "of=/data/dirty.bin", "bs=1M", "count=8", "conv=fsync", "status=none"],
            check=True,
            timeout=120,
        )

        with PointInTimeView(
            qmp, ["data", "root"], bitmap_name="sp-test-1", new_bitmap="sp-test-2", retire_base_bitmap=True, **hooks
        ) as view:
            data = view.source("data")
            try:
                changed = data.changed()
                assert changed is not None
                dirty = sum(e.length for e in changed)
                print(f"dirty after writing 8 MiB: {dirty / MiB:.2f} MiB in {len(changed)} extents")
                assert 8 * MiB <= dirty <= 12 * MiB, changed  # the file plus a little metadata
                for ext in changed:  # the changed ranges read fine at the instant
                    assert len(data.read(ext.offset, ext.length)) == ext.length
            finally:
                data.close()
            root_changed = view.source("root").changed()
            assert root_changed is not None and sum(e.length for e in root_changed) < 32 * MiB
        assert set(bitmaps(qmp, "data")) == {"sp-test-2"}  # the old one retired, the new one tracks

        with PointInTimeView(qmp, ["data"], bitmap_name="sp-test-2") as view:
            source = view.source("data")
            try:
                assert sum(e.length for e in source.changed() or []) < 2 * MiB  # nothing written since
            finally:
                source.close()
    finally:
        for node in ("data", "root"):
            for name in set(bitmaps(qmp, node)) & {"sp-test-1", "sp-test-2"}:
                qmp.execute("block-dirty-bitmap-remove", node=node, name=name)
    assert_no_leftovers(qmp)


def test_failed_view_leaves_nothing(qmp: QmpConnection, agent: GuestAgent) -> None:
    with (
        pytest.raises(FleeceError, match="no dirty bitmap"),
        PointInTimeView(qmp, ["data"], bitmap_name="never-made", new_bitmap="sp-x"),
    ):
        pass
    assert_no_leftovers(qmp)
    assert "sp-x" not in bitmaps(qmp, "data")

    def broken_freeze() -> None:
        raise RuntimeError("agent says no")

    with (
        pytest.raises(FleeceError, match="could not quiesce"),
        PointInTimeView(qmp, ["data"], freeze=broken_freeze, thaw=agent.fsfreeze_thaw),
    ):
        pass
    assert_no_leftovers(qmp)

    # an error inside the with-block: the bitmap this view started is dropped again
    with pytest.raises(KeyError), PointInTimeView(qmp, ["data"], new_bitmap="sp-y"):
        raise KeyError("backup failed")
    assert "sp-y" not in bitmaps(qmp, "data")
    assert_no_leftovers(qmp)
