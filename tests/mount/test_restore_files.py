"""`surepoint restore-files`: metadata, holes and symlinks kept; nothing ever written outside --to."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from surepoint.errors import InvalidArgument
from surepoint.mount.files import (
    CopyReport,
    GuestTarget,
    LocalTarget,
    normalize_request,
    resolve_source,
    restore_files,
)
from surepoint.vm.guest_agent import ExecResult
from tests.mount.conftest import MTIME, ODD_NAMES, MiB, make_ext4, make_staging, needs_root_and_tools

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners)")


def _snapshot(base: Path, exclude: Path) -> dict[str, str]:
    """Every path under base (not under exclude) with a hash of what it is."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == exclude or exclude in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == exclude or name.startswith(("catalog.sqlite", "mount-state")):
                continue  # the target, and what the command itself keeps
            if "mount-state" in path.parts:
                continue
            if path.is_symlink():
                result[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                result[str(path)] = "dir"
    return result


def _etc_passwd() -> str:
    return hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()


def _check_restored(staging: Path, restored: Path, rel: str = "") -> None:
    for path in sorted((staging / rel).rglob("*")) + ([staging / rel] if rel else []):
        other = restored / path.relative_to(staging)
        st, ot = os.lstat(path), os.lstat(other)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(ot.st_mode), path
        assert (st.st_uid, st.st_gid) == (ot.st_uid, ot.st_gid), path
        assert int(st.st_mtime) == int(ot.st_mtime), path
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(other)
            continue
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(ot.st_mode), path
        if path.is_file():
            assert path.read_bytes() == other.read_bytes(), path


# -- library level, on a plain directory (what a mount shows) ---------------------------------


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (the staging tree has files of other owners)")
    return make_staging(tmp_path / "staging")


def test_requests_with_dotdot_are_refused():
    for bad in ["../etc/passwd", "a/../../b", "..", "x/.."]:
        with pytest.raises(InvalidArgument):
            normalize_request(bad)
    assert normalize_request("/etc//nginx/./conf/") == ["etc", "nginx", "conf"]
    assert normalize_request("/") == []


def test_symlinks_in_the_middle_resolve_inside_the_guest_root(staging):
    assert resolve_source(str(staging), ["escape", "hello.txt"]) == ["hello.txt"]
    assert resolve_source(str(staging), ["escape", "escape", "dir", "sub"]) == ["dir", "sub"]
    assert resolve_source(str(staging), ["passwd-link"]) == ["passwd-link"]  # the last one is not followed
    with pytest.raises(FileNotFoundError):  # /etc/passwd of the guest, which has none
        resolve_source(str(staging), ["passwd-link", "x"])


@root_only
def test_local_restore_keeps_metadata_symlinks_and_holes(staging, tmp_path):
    to = tmp_path / "to"
    report = CopyReport()
    target = LocalTarget(str(to), False, report)
    try:
        restore_files(str(staging), ["/"], target, report)
    finally:
        target.close()
    assert not report.errors, report.errors
    _check_restored(staging, to)
    sparse = to / "sparse.img"
    assert sparse.stat().st_size == 16 * MiB
    assert sparse.stat().st_blocks * 512 < 1 * MiB  # holes stayed holes
    assert report.sparse_bytes >= 15 * MiB
    assert os.readlink(to / "passwd-link") == "/etc/passwd"
    for name in ODD_NAMES:
        assert (to / "odd" / name).read_text() == f"name {name!r}\n"


@root_only
def test_parent_directories_get_the_source_metadata(staging, tmp_path):
    to = tmp_path / "to"
    report = CopyReport()
    target = LocalTarget(str(to), False, report)
    try:
        restore_files(str(staging), ["dir/sub/deeper/leaf.txt"], target, report)
    finally:
        target.close()
    assert not report.errors
    assert sorted(p.name for p in (to / "dir").iterdir()) == ["sub"]
    for rel in ("dir", "dir/sub", "dir/sub/deeper", "dir/sub/deeper/leaf.txt"):
        src, dst = os.lstat(staging / rel), os.lstat(to / rel)
        assert (src.st_mode, src.st_uid, src.st_gid, int(src.st_mtime)) == (
            dst.st_mode,
            dst.st_uid,
            dst.st_gid,
            int(dst.st_mtime),
        ), rel


@root_only
def test_nothing_is_ever_written_outside_the_target(staging, tmp_path):
    to = tmp_path / "to"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me\n")
    to.mkdir()
    # traps planted in the target: a directory symlink and a file symlink pointing outside
    (to / "dir").symlink_to(outside)
    (to / "hello.txt").symlink_to(outside / "victim")
    before, passwd = _snapshot(tmp_path, to), _etc_passwd()

    for overwrite in (False, True):
        report = CopyReport()
        target = LocalTarget(str(to), overwrite, report)
        try:
            restore_files(
                str(staging),
                ["dir/sub/script.sh", "dir", "hello.txt", "passwd-link", "escape/escape/relative-link"],
                target,
                report,
            )
        finally:
            target.close()
        assert any("dir" in e and "not a directory" in e for e in report.errors), report.errors
        assert _snapshot(tmp_path, to) == before
        assert _etc_passwd() == passwd
        assert os.readlink(to / "passwd-link") == "/etc/passwd"
        assert os.readlink(to / "relative-link") == "hello.txt"
        if overwrite:  # the symlink in the way was replaced, not followed
            assert not (to / "hello.txt").is_symlink() and (to / "hello.txt").read_text() == "hello, world\n"
        else:
            assert (to / "hello.txt").is_symlink() and any("--overwrite" in e for e in report.errors)
    assert (outside / "victim").read_text() == "keep me\n"
    assert os.path.islink(to / "dir")


@root_only
def test_restoring_twice_over_own_symlinks_never_follows_them(staging, tmp_path):
    to = tmp_path / "to"
    passwd = _etc_passwd()
    for _ in range(2):
        report = CopyReport()
        target = LocalTarget(str(to), True, report)
        try:
            restore_files(str(staging), ["/"], target, report)
        finally:
            target.close()
        assert not report.errors, report.errors
    assert _etc_passwd() == passwd
    assert os.readlink(to / "passwd-link") == "/etc/passwd"


def test_unsafe_names_from_the_guest_are_refused(tmp_path):
    from surepoint.mount import files

    report = CopyReport()
    target = LocalTarget(str(tmp_path / "to"), False, report)
    try:
        handle = target.root()
        st = os.lstat(tmp_path)
        for name in ["..", ".", "a/b", "", "x\0y"]:
            files._copy_entry(str(tmp_path), st, handle, name, "/" + name, target, report, 0)
        target.release(handle)
    finally:
        target.close()
    assert len(report.errors) == 5 and all("unsafe file name" in e for e in report.errors)
    assert os.listdir(tmp_path / "to") == []


# -- into a VM, with a stand-in guest agent that runs the argv vectors on this host ------------


class FakeAgent:
    """The GuestAgent calls GuestTarget makes, carried out locally (the 'guest' is a directory here)."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []
        self.files: dict[int, object] = {}
        self.modes_written: list[int] = []

    def exec(self, argv, *, timeout=60.0, check=False, **_):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        self.argvs.append(argv)
        proc = subprocess.run(argv, capture_output=True)
        return ExecResult(1, proc.returncode, None, proc.stdout, proc.stderr)

    def file_open(self, path, mode="r"):
        if mode[0] in "wa" and not os.path.lexists(path):
            # as qemu-ga does: a file it creates gets mode 0666, whatever the umask
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.chmod(path, 0o666)
        f = open(path, mode)  # noqa: SIM115 - closed by file_close
        self.files[f.fileno()] = f
        return f.fileno()

    def file_write(self, handle, data):
        # who else could read or change the file while restored bytes go into it
        self.modes_written.append(stat.S_IMODE(os.fstat(handle).st_mode))
        return self.files[handle].write(data)

    def file_close(self, handle):
        self.files.pop(handle).close()


@root_only
def test_guest_target_restores_with_argv_only_and_refuses_symlinked_dirs(staging, tmp_path):
    guest = tmp_path / "guest"
    outside = tmp_path / "outside"
    outside.mkdir()
    agent = FakeAgent()
    report = CopyReport()
    target = GuestTarget(agent, str(guest / "restore"), False, report)
    restore_files(str(staging), ["hello.txt", "dir", "passwd-link", "odd", "private"], target, report)
    assert not report.errors, report.errors
    restored = guest / "restore"
    _check_restored(staging, restored, "dir")
    _check_restored(staging, restored, "odd")
    assert (restored / "hello.txt").read_text() == "hello, world\n"
    assert os.readlink(restored / "passwd-link") == "/etc/passwd"
    assert os.stat(restored / "private").st_uid == 1234 and stat.S_IMODE(os.stat(restored / "private").st_mode) == 0o600
    assert not list(restored.glob(".surepoint-restore.*"))
    # while the bytes went in, no other user of the guest could read or change them
    assert agent.modes_written and all(mode & 0o077 == 0 for mode in agent.modes_written), agent.modes_written
    # odd names went through as single argv elements, never through a shell
    assert any(argv[-1].endswith("new\nline") for argv in agent.argvs)

    # a symlinked directory in the guest is not followed; an existing file is not replaced without --overwrite
    (restored / "dir").rename(restored / "dir-old")
    (restored / "dir").symlink_to(outside)
    report = CopyReport()
    target = GuestTarget(agent, str(guest / "restore"), False, report)
    restore_files(str(staging), ["dir/sub/script.sh", "hello.txt"], target, report)
    assert len(report.errors) == 2
    assert os.listdir(outside) == []


# -- the command, end to end ---------------------------------------------------------------------


@pytest.fixture
def backed_up(mcli, tmp_path):
    staging = make_staging(tmp_path / "staging")
    image = tmp_path / "guest.img"
    make_ext4(image, staging)
    mcli.run("init", "--encryption", "none", check=True)
    point = mcli.run("backup", str(image), "--name", "guest", "--json", check=True).json()["id"]
    return point, staging


class TestCommand:
    pytestmark = needs_root_and_tools()

    def test_restore_files_from_a_backup(self, mcli, tmp_path, backed_up):
        point, staging = backed_up
        to = tmp_path / "to"
        result = mcli.run(
            "restore-files", point, "/dir", "/sparse.img", "passwd-link", "/odd", "--to", str(to), "--json"
        )
        assert result.returncode == 0, result.stderr
        data = result.json()
        assert data["files"] >= 3 + len(ODD_NAMES) and data["symlinks"] == 1
        _check_restored(staging, to, "dir")
        _check_restored(staging, to, "odd")
        assert (to / "sparse.img").read_bytes() == (staging / "sparse.img").read_bytes()
        assert (to / "sparse.img").stat().st_blocks * 512 < 1 * MiB
        assert int((to / "sparse.img").stat().st_mtime) == MTIME
        assert os.readlink(to / "passwd-link") == "/etc/passwd"
        # the internal mount is gone again
        assert mcli.run("mounts", "--json", check=True).json() == []

    def test_restore_files_reuses_an_existing_mount(self, mcli, tmp_path, backed_up):
        point, staging = backed_up
        where = tmp_path / "mnt"
        where.mkdir()
        mcli.run("mount", point, str(where), check=True)
        to = tmp_path / "to"
        mcli.run("restore-files", point, "/hello.txt", "--to", str(to), "--partition", "fs", check=True)
        assert (to / "hello.txt").read_text() == "hello, world\n"
        assert [m["dir"] for m in mcli.run("mounts", "--json", check=True).json()] == [str(where)]
        mcli.run("umount", str(where), check=True)

    def test_dotdot_and_escaping_requests_write_nothing_outside(self, mcli, tmp_path, backed_up):
        point, _ = backed_up
        to = tmp_path / "to"
        to.mkdir()
        before, passwd = _snapshot(tmp_path, to), _etc_passwd()
        bad = mcli.run("restore-files", point, "../../etc/passwd", "--to", str(to))
        assert bad.returncode == 2 and "'..' is not allowed" in bad.stderr
        ok = mcli.run("restore-files", point, "escape/escape/hello.txt", "passwd-link", "--to", str(to))
        assert ok.returncode == 0, ok.stderr
        assert (to / "hello.txt").read_text() == "hello, world\n"
        assert os.readlink(to / "passwd-link") == "/etc/passwd"
        assert _snapshot(tmp_path, to) == before and _etc_passwd() == passwd
        missing = mcli.run("restore-files", point, "/no/such/file", "--to", str(to))
        assert missing.returncode == 1 and "no/such/file" in missing.stderr
        assert mcli.run("mounts", "--json", check=True).json() == []
