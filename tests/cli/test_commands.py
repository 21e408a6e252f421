"""The command groups as a user meets them: `vm backup` and its older spelling, the hints after an
error, one passphrase reader for the repository and the new passphrase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli, make_image

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def point(cli: Cli, tmp_path: Path) -> str:
    image = make_image(tmp_path / "disk.img", 1 << 20, seed=3, regions=2, region_size=64 << 10)
    cli.run("init", check=True)
    return cli.run("backup", str(image), "--json", check=True).json()["id"]


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_vm_backup_and_backup_vm_are_one_command(cli: Cli, point: str):
    for args in (["vm", "backup", "no-such-vm-here"], ["backup", "vm", "no-such-vm-here"]):
        result = cli.run(*args, "--json", env={"SUREPOINT_LIBVIRT_URI": "none"})
        assert result.returncode == 1, result.stderr
        assert result.json() == {
            "vms": [{"vm": "no-such-vm-here", "status": "failed", "error": result.json()["vms"][0]["error"]}]
        }
        assert "no-such-vm-here" in result.json()["vms"][0]["error"]
        assert last_line(result.stderr).startswith("error: backup of VM no-such-vm-here failed: ")
    result = cli.run("backup", "vm")
    assert (
        result.returncode == 2
        and last_line(result.stderr) == "error: name at least one VM: surepoint vm backup NAME..."
    )
    assert cli.run("vm", "backup").returncode == 2  # typer: missing argument
    assert cli.run("vm", "backup", "x", "--fallback", "maybe").returncode == 2


def test_errors_end_with_the_advice_of_the_command_line(cli: Cli, point: str, tmp_path: Path):
    result = cli.run("show", "nope")
    assert result.returncode == 1
    assert last_line(result.stderr) == "error: no restore point 'nope'; see `surepoint list`"
    result = cli.run("vm", "restore", point, "--to", str(tmp_path / "vm"))
    assert result.returncode == 2
    assert last_line(result.stderr).endswith(
        "is not a VM backup; `surepoint restore` restores the disks of a file backup"
    )
    result = cli.run("instant-recover", "--discard", "--workdir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "no instant recovery in" in result.stderr and "give the --workdir of an instant recovery" in result.stderr


def test_one_passphrase_reader(cli: Cli, point: str, tmp_path: Path):
    env = {"SUREPOINT_NEW_PASSPHRASE_FILE": str(tmp_path / "missing")}
    result = cli.run("passwd", env=env)
    assert result.returncode == 2
    assert last_line(result.stderr).startswith(f"error: cannot read passphrase file {tmp_path / 'missing'}: ")
    result = cli.run("passwd")
    assert result.returncode == 2 and "SUREPOINT_NEW_PASSPHRASE or --new-passphrase-file" in result.stderr
    new = tmp_path / "new-passphrase"
    new.write_text("battery staple\n")  # the final newline is not part of the passphrase
    cli.run("passwd", "--new-passphrase-file", str(new), check=True)
    assert cli.run("list").returncode == 1  # the old passphrase no longer opens it
    assert cli.run("list", "--json", env={"SUREPOINT_PASSPHRASE": "battery staple"}, check=True)
    result = cli.run("list", env={"SUREPOINT_PASSPHRASE_FILE": str(new), "SUREPOINT_PASSPHRASE": ""})
    assert result.returncode == 1  # the environment variable wins over the file, even when empty
    env = {k: v for k, v in cli.env.items() if k != "SUREPOINT_PASSPHRASE"}
    cli.env = env
    assert cli.run("--passphrase-file", str(new), "list", check=True).returncode == 0
    result = cli.run("list")
    assert result.returncode == 2 and "set SUREPOINT_PASSPHRASE or pass --passphrase-file" in result.stderr


def test_compression_levels(cli: Cli, tmp_path: Path):
    """zstd 1 by default; the fast levels -7..-1 and 1..19 are accepted, 0 and 20+ refused with the range."""
    image = make_image(tmp_path / "disk.img", 4 << 20, seed=5, regions=4, region_size=256 << 10)
    for level in ("0", "-8", "20"):
        refused = cli.run("init", "--compression-level", level)
        assert refused.returncode == 2 and "choose 1 to 19, or -7 to -1" in refused.stderr, refused.stderr
        assert not (cli.repo / "config").exists()
    cli.run("init", check=True)
    assert json.loads((cli.repo / "config").read_text())["compression_level"] == 1
    for level in ("-7", "19"):
        repo = tmp_path / f"repo{level}"
        env = {"SUREPOINT_REPO": str(repo)}
        cli.run("init", "--compression-level", level, env=env, check=True)
        point = cli.run("backup", str(image), "--name", "disk", "--json", env=env, check=True).json()["id"]
        restored = tmp_path / f"restored{level}.img"
        cli.run("restore", point, "--to", str(restored), env=env, check=True)
        assert restored.read_bytes() == image.read_bytes()
