"""restore-files protects the host that restores: no set-uid programs, a private --to, escaped names."""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

import pytest

from surepoint.mount.files import CopyReport, LocalTarget, restore_files
from tests.mount.conftest import MTIME, make_ext4, mcli, needs_root_and_tools  # noqa: F401 - mcli is a fixture

HOSTILE_NAMES = ["\x1b[2J\x1b[Hcleared", "title\x1b]0;owned\x07", "csi\x9b31m", "bidi\u202etxt.sh", "forged\nerror: x"]


def _guest_tree(root: Path) -> Path:
    """A guest's files as a mount shows them: set-uid/set-gid programs, a set-gid directory, hostile names."""
    root.mkdir()
    (root / "bin").mkdir()
    for name, mode in [("su", 0o4755), ("wall", 0o2755), ("both", 0o6711), ("plain", 0o755)]:
        path = root / "bin" / name
        path.write_bytes(b"\x7fELF" + name.encode())
        os.chown(path, 0, 0)
        os.chmod(path, mode)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o2775)
    (root / "names").mkdir()
    for name in HOSTILE_NAMES:
        (root / "names" / name).write_text("x")
    os.mkfifo(root / "names" / "fifo\x1b[31m")
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def _raw_controls(lines: list[str]) -> list[str]:
    return [line for line in lines if any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp"} for c in line)]


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (set-uid files of root)")


@root_only
def test_set_id_bits_are_cleared_unless_kept(tmp_path):
    guest = _guest_tree(tmp_path / "guest")
    report = CopyReport()
    target = LocalTarget(str(tmp_path / "to"), False, report)
    try:
        restore_files(str(guest), ["/bin", "/shared"], target, report)
    finally:
        target.close()
    assert not report.errors, report.errors
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "to" / "bin").iterdir()}
    assert modes == {"su": 0o755, "wall": 0o755, "both": 0o711, "plain": 0o755}
    assert (tmp_path / "to" / "bin" / "su").stat().st_uid == 0
    assert stat.S_IMODE((tmp_path / "to" / "shared").stat().st_mode) == 0o2775  # a directory keeps set-gid
    cleared = [w for w in report.warnings if "set-uid/set-gid bits cleared" in w]
    assert sorted(w.split(":")[0] for w in cleared) == ["/bin/both", "/bin/su", "/bin/wall"]

    report = CopyReport()
    target = LocalTarget(str(tmp_path / "kept"), False, report, keep_setuid=True)
    try:
        restore_files(str(guest), ["/bin"], target, report)
    finally:
        target.close()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "kept" / "bin").iterdir()}
    assert modes == {"su": 0o4755, "wall": 0o2755, "both": 0o6711, "plain": 0o755}
    assert not [w for w in report.warnings if "cleared" in w]


def test_a_new_target_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        report = CopyReport()
        LocalTarget(str(tmp_path / "new" / "to"), False, report).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "to").stat().st_mode) == 0o700
    assert not report.warnings

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    report = CopyReport()
    LocalTarget(str(shared), False, report).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # the operator's directory keeps its mode
    assert any("can be entered by other users" in w for w in report.warnings)


@root_only
def test_every_reported_name_is_escaped(tmp_path):
    guest = _guest_tree(tmp_path / "guest")
    (tmp_path / "to" / "names").mkdir(parents=True)
    (tmp_path / "to" / "names" / HOSTILE_NAMES[0]).mkdir()  # in the way: an error naming it
    report = CopyReport()
    target = LocalTarget(str(tmp_path / "to"), False, report)
    try:
        restore_files(str(guest), ["/names", "/no\x1b[2Jsuch"], target, report)
    finally:
        target.close()
    lines = report.errors + report.warnings + report.skipped
    assert len(report.errors) == 2 and len(report.skipped) == 1
    assert not _raw_controls(lines), lines
    assert any("\\e[2J\\e[Hcleared" in e for e in report.errors)
    assert "/names/fifo\\e[31m: FIFO, not restored" in report.skipped
    # the files themselves keep their real names
    restored = set(os.listdir(tmp_path / "to" / "names"))
    assert set(HOSTILE_NAMES) <= restored


class TestCommand:
    pytestmark = needs_root_and_tools()

    def test_restore_files_command_strips_set_id_and_escapes(self, mcli, tmp_path):  # noqa: F811
        guest = _guest_tree(tmp_path / "guest")
        image = tmp_path / "guest.img"
        make_ext4(image, guest, size=16 << 20)
        mcli.run("init", "--encryption", "none", check=True)
        point = mcli.run("backup", str(image), "--name", "guest", "--json", check=True).json()["id"]
        to = tmp_path / "to"
        result = mcli.run("restore-files", point, "/bin", "/names", "--to", str(to))
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(to.stat().st_mode) == 0o700
        assert stat.S_IMODE((to / "bin" / "su").stat().st_mode) == 0o755
        assert "\x1b" not in result.stdout + result.stderr and "\x9b" not in result.stderr
        assert "/bin/su: set-uid/set-gid bits cleared" in result.stderr
        assert "fifo\\e[31m" in result.stderr

        kept = tmp_path / "kept"
        mcli.run("restore-files", point, "/bin/su", "--to", str(kept), "--keep-setuid", check=True)
        assert stat.S_IMODE((kept / "bin" / "su").stat().st_mode) == 0o4755
