"""Names chosen by users and guests never write control characters to the operator's terminal."""

from __future__ import annotations

from tests.conftest import make_image

MiB = 1 << 20
HOSTILE = "web\x1b]0;owned\x07\x1b[2J\u202e"


def _no_controls(text: str) -> bool:
    return not any(c in text for c in ("\x1b", "\x07", "\u202e", "\x9b"))


def test_hostile_restore_point_names_are_escaped_everywhere(cli, tmp_path):
    cli.run("init", "--encryption", "none", check=True)
    image = make_image(tmp_path / "disk.img", 2 * MiB, seed=1)
    cli.run("backup", str(image), "--name", HOSTILE, check=True)
    for args in (["list"], ["verify"], ["events"], ["restore", HOSTILE + "x:latest", "--to", str(tmp_path / "r")]):
        result = cli.run(*args)
        assert _no_controls(result.stdout + result.stderr), (args, result.stdout + result.stderr)
    listed = cli.run("list").stdout
    assert "web\\e]0;owned\\x07\\e[2J" in listed
    missing = cli.run("restore", HOSTILE + "x:latest", "--to", str(tmp_path / "r"))
    assert missing.returncode != 0 and "no restore point named" in missing.stderr
    # --json output stays exact (JSON escapes control characters itself)
    assert cli.points()[0]["name"] == HOSTILE
