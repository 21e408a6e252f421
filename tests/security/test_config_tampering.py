"""The repository config is checked: no downgrade of encryption, no absurd values, no traceback."""

from __future__ import annotations

import json
import stat

from tests.conftest import make_image

MiB = 1 << 20


def _edit_config(cli, change) -> None:
    path = cli.repo / "config"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_a_config_edited_to_no_encryption_is_refused(cli, tmp_path):
    cli.env["SUREPOINT_KNOWN_REPOSITORIES"] = str(tmp_path / "known" / "repos.json")
    cli.run("init", "--encryption", "aes-256-gcm", check=True)
    image = make_image(tmp_path / "disk.img", 2 * MiB)
    cli.run("backup", str(image), "--name", "disk", check=True)
    known = tmp_path / "known" / "repos.json"
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    _edit_config(cli, lambda c: c.update(encryption=None))
    refused = cli.run("backup", str(image), "--name", "disk")
    assert refused.returncode == 3 and "aes-256-gcm-encrypted" in refused.stderr, refused.stderr
    assert len(list((cli.repo / "restorepoints").iterdir())) == 1  # nothing was written in plain text


def test_absurd_config_values_are_damage_not_a_hang(cli, tmp_path):
    cli.env["SUREPOINT_KNOWN_REPOSITORIES"] = str(tmp_path / "known.json")
    cli.run("init", "--encryption", "aes-256-gcm", check=True)
    good = (cli.repo / "config").read_text()
    for change in (
        lambda c: c.update(chunk_size=7),
        lambda c: c.update(chunk_size="big"),
        lambda c: c.update(compression_level=10**9),
        lambda c: c["encryption"]["kdf"].update(n=2**30),
        lambda c: c["encryption"]["kdf"].update(r=[1]),
        lambda c: c["encryption"].update(wrapped_key="!!"),
        lambda c: c.update(id=None),
    ):
        (cli.repo / "config").write_text(good)
        _edit_config(cli, change)
        result = cli.run("list", timeout=60)
        assert result.returncode == 3 and "repository config is damaged" in result.stderr, result.stderr
