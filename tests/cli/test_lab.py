"""`surepoint lab` mistakes that need no VM: each a clear line, an exit code, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli, make_image

pytestmark = pytest.mark.root


@pytest.fixture
def host_point(cli: Cli, tmp_path: Path) -> str:
    cli.run("init", "--encryption", "none", check=True)
    image = make_image(tmp_path / "disk.img", 8 << 20)
    return cli.run("backup", str(image), "--name", "files", "--json", check=True).json()["id"]


def test_lab_refuses_what_it_cannot_boot(cli: Cli, host_point: str, tmp_path: Path) -> None:
    cli.env["SUREPOINT_LAB_DIR"] = str(tmp_path / "labs")
    lab = tmp_path / "lab.toml"
    lab.write_text("[lab]\n")
    result = cli.run("lab", "verify", host_point, "--group", str(lab))
    assert result.returncode == 2 and "is not a VM backup: a lab can only boot VMs" in result.stderr, result.stderr
    result = cli.run("lab", "verify", host_point)  # no lab file: the defaults, same refusal
    assert result.returncode == 2 and "is not a VM backup" in result.stderr, result.stderr
    result = cli.run("lab", "verify", "nosuchpoint", "--group", str(lab))
    assert result.returncode == 1 and "no restore point 'nosuchpoint'" in result.stderr, result.stderr
    job = tmp_path / "files.toml"
    job.write_text(f'sources = ["{tmp_path / "disk.img"}"]\n')
    result = cli.run("lab", "verify", str(job), "--group", str(lab))
    assert result.returncode == 2 and "backs up image files, not a VM" in result.stderr, result.stderr
    vm_job = tmp_path / "vm.toml"
    vm_job.write_text('vm = "never-backed-up"\n')
    result = cli.run("lab", "verify", str(vm_job), "--group", str(lab))
    assert result.returncode == 2 and "has no restore point yet" in result.stderr, result.stderr
    assert not (tmp_path / "labs").exists() or not any((tmp_path / "labs").iterdir())


def test_lab_file_mistakes_are_named(cli: Cli, host_point: str, tmp_path: Path) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('[[group]]\nname = "db"\nrestore_point = "x"\n[[group.test]]\ntype = "port"\n')
    result = cli.run("lab", "verify", host_point, "--group", str(lab))
    assert result.returncode == 2, result.stderr
    assert f"{lab} group 'db' test 1" in result.stderr and "port" in result.stderr, result.stderr
    result = cli.run("lab", "verify", host_point, "--group", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr


def test_lab_list_and_clean_with_nothing_to_do(cli: Cli, tmp_path: Path) -> None:
    cli.env["SUREPOINT_LAB_DIR"] = str(tmp_path / "labs")
    assert cli.run("lab", "list", "--json", check=True).json() == {"labs": []}
    assert cli.run("lab", "clean", "--json", check=True).json()["cleaned"] == []
