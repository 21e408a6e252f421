"""`surepoint scan --yara` and `--find-clean`: YARA rules over a restore point's files, with guest paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.scan.yara_scan import BadRules, ScanReport, load_rules, scan_tree
from tests.conftest import Cli

MARKER = b"YOUR FILES ARE ENCRYPTED-" + b"7f3a9c"  # split so this source file does not match itself
RULES = """
rule ransom_note
{
    strings:
        $a = "YOUR FILES ARE ENCRYPTED-7f3a9c"
    condition:
        $a
}
"""
HARMLESS = 'rule never { strings: $a = "no file holds this 0d9e8c7b" condition: $a }\n'


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "ransom.yar"
    path.write_text(RULES)
    return path


def test_bad_rules_are_one_clear_error(tmp_path: Path):
    broken = tmp_path / "broken.yar"
    broken.write_text('rule broken { strings: $a = "x" condition: $b }\n')
    with pytest.raises(BadRules, match="do not compile"):
        load_rules(str(broken))
    with pytest.raises(BadRules, match="cannot read"):
        load_rules(str(tmp_path / "missing.yar"))
    cli = Cli(tmp_path)
    result = cli.run("scan", "x:latest", "--yara", str(broken))
    assert result.returncode == 2
    assert "do not compile" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli.run("scan", "--yara", str(broken)).returncode == 2  # neither a point nor --find-clean


def test_tree_scan_gives_guest_paths_and_never_follows_links(tmp_path: Path, rules: Path):
    root = tmp_path / "fs"
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "note\x1b[2J.txt").write_bytes(b"hi " + MARKER)
    (root / "home" / "user" / "clean.txt").write_bytes(b"nothing here")
    outside = tmp_path / "host-secret"
    outside.write_bytes(MARKER)
    (root / "link-to-host").symlink_to(outside)
    (root / "dir-link").symlink_to(tmp_path)
    report = ScanReport()
    scan_tree(load_rules(str(rules)), str(root), "/srv", report)
    assert [(m.path, m.rules) for m in report.matches] == [("/srv/home/user/note\x1b[2J.txt", ["ransom_note"])]
    assert report.files == 2 and report.outcome == "match"
    clean = ScanReport()
    scan_tree(load_rules(str(rules)), str(root / "home" / "user"), "/", clean, max_file_size=5)
    assert clean.outcome == "clean" and clean.files == 0 and len(clean.skipped) == 2
