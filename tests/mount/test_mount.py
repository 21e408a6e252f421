"""`surepoint mount` / `umount`: raw images and partition filesystems served from the repository."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SUREPOINT, sha256_file
from tests.mount.conftest import (
    LINUX_FS,
    MIN_SIZE,
    MS_BASIC,
    MiB,
    loops_under,
    make_ext4,
    make_fs_with_files,
    make_staging,
    mounts_under,
    needs_root_and_tools,
    second_fstype,
    write_ebr,
    write_gpt,
    write_mbr,
)

pytestmark = needs_root_and_tools()


def _backup(cli, image: Path, encryption: str = "none") -> str:
    cli.run("init", "--encryption", encryption, check=True)
    return cli.run("backup", str(image), "--name", "guest", "--json", check=True).json()["id"]


def _mount(cli, point: str, where: Path, *extra: str) -> dict:
    where.mkdir(exist_ok=True)
    return cli.run("mount", point, str(where), "--json", *extra, check=True).json()


def _assert_same_tree(original: Path, mounted: Path) -> None:
    for path in sorted(original.rglob("*")):
        rel = path.relative_to(original)
        other = mounted / rel
        st, ot = os.lstat(path), os.lstat(other)
        assert st.st_mode == ot.st_mode, rel
        assert (st.st_uid, st.st_gid) == (ot.st_uid, ot.st_gid), rel
        assert int(st.st_mtime) == int(ot.st_mtime), rel
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(other), rel
        elif path.is_file():
            assert filecmp.cmp(path, other, shallow=False), rel


@pytest.fixture
def ext4_image(tmp_path: Path) -> tuple[Path, Path]:
    staging = make_staging(tmp_path / "staging")
    image = tmp_path / "guest.img"
    make_ext4(image, staging)
    return image, staging


def test_mount_from_an_s3_repository(mcli, tmp_path, ext4_image, seaweedfs):
    """The FUSE server is a forked child: it reads S3 over connections of its own, not its parent's."""
    from tests.servers.seaweedfs import use_s3

    image, staging = ext4_image
    use_s3(mcli, seaweedfs, tmp_path)
    point = _backup(mcli, image, "aes-256-gcm")
    where = tmp_path / "mnt"
    state = _mount(mcli, point, where)
    assert state["alive"] and [m["volume"] for m in state["mounts"]] == ["fs"]
    assert sha256_file(where / "disks" / "0-guest.img.raw") == sha256_file(image)
    _assert_same_tree(staging, where / "disk0" / "fs")
    mcli.run("umount", str(where), check=True)


def test_mount_from_an_ssh_repository(mcli, tmp_path, ext4_image, sshd):
    """Over ssh:// the forked FUSE server runs an ssh session of its own."""
    image, staging = ext4_image
    mcli.repo = sshd.url(tmp_path / "remote-repo")
    mcli.env.update(sshd.env(), SUREPOINT_REPO=mcli.repo)
    point = _backup(mcli, image, "aes-256-gcm")
    where = tmp_path / "mnt"
    state = _mount(mcli, point, where)
    assert state["alive"] and [m["volume"] for m in state["mounts"]] == ["fs"]
    _assert_same_tree(staging, where / "disk0" / "fs")
    mcli.run("umount", str(where), check=True)


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_mount_whole_disk_ext4_reads_back_and_is_read_only(mcli, tmp_path, ext4_image, encryption):
    image, staging = ext4_image
    point = _backup(mcli, image, encryption)
    repo_before = _repo_listing(mcli.repo)
    where = tmp_path / "mnt"
    state = _mount(mcli, point, where)

    assert state["alive"] and state["status"] == "mounted"
    raw = where / "disks" / "0-guest.img.raw"
    assert sha256_file(raw) == sha256_file(image)
    assert [m["volume"] for m in state["mounts"]] == ["fs"]
    fs = where / "disk0" / "fs"
    _assert_same_tree(staging, fs)
    assert os.readlink(fs / "passwd-link") == "/etc/passwd"

    # Writes fail cleanly: read-only everywhere.
    for attempt in (
        lambda: os.open(fs / "hello.txt", os.O_WRONLY | os.O_APPEND),
        lambda: os.open(fs / "new-file", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(fs / "newdir"),
        lambda: os.unlink(fs / "hello.txt"),
        lambda: os.open(raw, os.O_RDWR),
        lambda: os.mkdir(where / "newdir"),
        lambda: os.open(where / "disks" / "x", os.O_WRONLY | os.O_CREAT, 0o644),
    ):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS

    listed = mcli.run("mounts", "--json", check=True).json()
    assert [m["dir"] for m in listed] == [str(where)]
    mcli.run("umount", str(where), check=True)
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)
    assert not list((tmp_path / "mount-state").glob("*.json"))
    assert os.listdir(where) == []
    assert _repo_listing(mcli.repo) == repo_before  # the mount wrote nothing, not even a lock


def _repo_listing(repo: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns) for p in repo.rglob("*") if p.is_file()}


def _partitioned(tmp_path: Path, scheme: str, fstype: str) -> tuple[Path, Path, dict[str, bytes]]:
    """Two partitions, ext4 then vfat (else xfs, else ext4: see second_fstype), under a GPT or an MBR."""
    staging = make_staging(tmp_path / "staging")
    image = tmp_path / f"{scheme}.img"
    ext4_start, ext4_size = 1 * MiB, 48 * MiB
    second_start, second_size = 50 * MiB, MIN_SIZE[fstype]
    size = second_start + second_size + 2 * MiB
    second_type = 0x0C if fstype == "vfat" else 0x83
    if scheme == "gpt":
        write_gpt(
            image,
            size,
            [
                (LINUX_FS, ext4_start // 512, (ext4_start + ext4_size) // 512 - 1, "root"),
                (
                    MS_BASIC if fstype == "vfat" else LINUX_FS,
                    second_start // 512,
                    (second_start + second_size) // 512 - 1,
                    "data",
                ),
            ],
        )
    else:
        # primary ext4 (1), extended (2) holding one logical partition (5) after its EBR
        ext_start = second_start - MiB
        write_mbr(
            image,
            [(0x83, ext4_start // 512, ext4_size // 512), (0x05, ext_start // 512, (second_size + MiB) // 512)],
            size,
        )
        write_ebr(image, ext_start // 512, (second_type, MiB // 512, second_size // 512), None, 0)
    make_ext4(image, staging, size=ext4_size, offset=ext4_start)
    files = {"README.TXT": b"second file system\r\n", "DIR/DATA.BIN": os.urandom(1 * MiB + 7)}
    make_fs_with_files(image, fstype, second_start, second_size, files)
    return image, staging, files


@pytest.mark.parametrize("scheme", ["gpt", "mbr"])
def test_mount_partitioned_disk_mounts_each_filesystem(mcli, tmp_path, scheme):
    fstype = second_fstype()
    image, staging, files = _partitioned(tmp_path, scheme, fstype)
    point = _backup(mcli, image)
    where = tmp_path / "mnt"
    state = _mount(mcli, point, where)
    mounted = {m["volume"]: m for m in state["mounts"]}
    second = "part2" if scheme == "gpt" else "part5"
    assert set(mounted) == {"part1", second}, state
    assert mounted["part1"]["fstype"] == "ext4" and "noload" in mounted["part1"]["options"]
    assert mounted[second]["fstype"] == fstype
    if fstype == "xfs":
        assert "norecovery" in mounted[second]["options"]
    _assert_same_tree(staging, where / "disk0" / "part1")
    for name, data in files.items():
        assert (where / "disk0" / second / name).read_bytes() == data
    assert sha256_file(where / "disks" / f"0-{scheme}.img.raw") == sha256_file(image)
    # the extended partition of the MBR is a container, not a volume
    assert sorted(os.listdir(where / "disk0")) == sorted(["part1", second])
    with pytest.raises(OSError) as exc:
        (where / "disk0" / second / "new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    mcli.run("umount", str(where), check=True)
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)


def test_killed_server_is_cleaned_by_umount_and_by_next_mount(mcli, tmp_path, ext4_image):
    image, _ = ext4_image
    point = _backup(mcli, image)
    first = tmp_path / "first"
    state = _mount(mcli, point, first)
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.2)
    assert loops_under(tmp_path)  # left behind by the crash
    mcli.run("umount", str(first), check=True)
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)

    # A second crash, cleaned by the next mount instead.
    state = _mount(mcli, point, first)
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.2)
    second = tmp_path / "second"
    _mount(mcli, point, second)
    assert not [m for m in mounts_under(tmp_path) if str(first) in m]
    assert len(loops_under(tmp_path)) == 1
    assert (second / "disk0" / "fs" / "hello.txt").read_text() == "hello, world\n"
    mcli.run("umount", str(second), check=True)
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)


def test_missing_chunk_gives_eio_and_a_log_line_never_zeros(mcli, tmp_path):
    image = tmp_path / "random.img"
    image.write_bytes(os.urandom(32 * MiB))
    mcli.run("init", "--encryption", "none", "--chunk-size", "1048576", check=True)
    point = mcli.run("backup", str(image), "--json", check=True).json()["id"]
    # delete the chunk holding bytes [5 MiB, 6 MiB)
    index_entries = _chunk_ids(mcli, point)
    victim = index_entries[5]
    chunk_file = mcli.repo / "chunks" / victim[:2] / victim
    chunk_file.unlink()

    where = tmp_path / "mnt"
    state = _mount(mcli, point, where, "--images-only")
    raw = where / "disks" / "0-random.img.raw"
    original = image.read_bytes()
    fd = os.open(raw, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 4 * MiB) == original[4 * MiB : 5 * MiB]
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 5 * MiB + 8192)
        assert exc.value.errno == errno.EIO
        assert os.pread(fd, MiB, 6 * MiB) == original[6 * MiB : 7 * MiB]
    finally:
        os.close(fd)
    # a sequential read of everything stops at the damaged range with EIO
    with open(raw, "rb") as f, pytest.raises(OSError) as exc:
        while f.read(MiB):
            pass
    assert exc.value.errno == errno.EIO
    log = Path(state["log"]).read_text()
    assert point in log and f"bytes {5 * MiB}-{6 * MiB - 1}" in log and "byte offset" in log
    assert "missing" in log
    mcli.run("umount", str(where), check=True)
    assert Path(state["log"]).exists()  # a log with errors is kept for a look afterwards


def _chunk_ids(cli, point: str) -> list[str]:
    """Chunk ids of disk 0, read through the library (the index is an envelope)."""
    code = (
        "import json,sys\n"
        "from surepoint import storage\n"
        "from surepoint.repo.repository import Repository\n"
        "r = Repository.open(storage.open(sys.argv[1]), lambda: '')\n"
        "p = r.resolve(sys.argv[2])\n"
        "print(json.dumps([i.hex() for i in r.load_index(p, 0).ids]))\n"
    )
    python = os.path.join(os.path.dirname(SUREPOINT), "python")
    out = subprocess.run([python, "-c", code, str(cli.repo), point], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_foreground_mount_logs_to_stderr_and_ctrl_c_unmounts(mcli, tmp_path, ext4_image):
    image, _ = ext4_image
    point = _backup(mcli, image)
    where = tmp_path / "mnt"
    where.mkdir()
    proc = subprocess.Popen(
        [SUREPOINT, "mount", point, str(where), "--foreground"],
        env=mcli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (where / "disk0" / "fs" / "hello.txt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (where / "disk0" / "fs" / "hello.txt").read_text() == "hello, world\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"serving restore point {point}" in err
    assert "unmounted" in out
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)


def test_mount_refuses_a_busy_directory_and_umount_a_foreign_one(mcli, tmp_path, ext4_image):
    image, _ = ext4_image
    point = _backup(mcli, image)
    where = tmp_path / "mnt"
    _mount(mcli, point, where)
    again = mcli.run("mount", point, str(where))
    assert again.returncode == 2 and "already a mountpoint" in again.stderr
    other = mcli.run("umount", str(tmp_path))
    assert other.returncode == 2 and "no surepoint mount" in other.stderr
    # busy: a file open in the filesystem blocks a plain umount, --lazy goes through
    with open(where / "disk0" / "fs" / "hello.txt") as held:
        busy = mcli.run("umount", str(where))
        assert busy.returncode != 0 and "--lazy" in busy.stderr
        assert held.read() == "hello, world\n"
        mcli.run("umount", str(where), "--lazy", check=True)
    deadline = time.monotonic() + 10
    while loops_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not loops_under(tmp_path) and not mounts_under(tmp_path)
