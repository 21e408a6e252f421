"""The import contract in pyproject.toml ([tool.importlinter]): layers point one way, no cycles.

`lint-imports` must pass on the tree, and must fail on a copy of it with a planted violation (so
a broken configuration that checks nothing cannot pass unnoticed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports on the `surepoint` package found in `tree`, with that tree's pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_its_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "surepoint", tmp_path / "surepoint", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    with open(path, "a") as f:
        f.write(f"\n{line}\n")


@pytest.mark.parametrize(
    ("module", "line", "contract", "named"),
    [
        # the repository format must not know about jobs
        ("surepoint.repo.chunks", "import surepoint.jobs.gc", "layers point one way BROKEN", "surepoint.repo.chunks"),
        # storage is the bottom layer
        ("surepoint.storage.local", "import surepoint.repo.manifest", "layers point one way BROKEN", "storage.local"),
        # mount uses vm (guest agents); vm using mount would close a cycle
        ("surepoint.vm.qmp", "import surepoint.mount.reader", "no import cycles between sibling", ".vm -> .mount"),
        # the shared helpers sit below every layer
        ("surepoint.timestamps", "import surepoint.vm.qmp", "shared helpers import no layer BROKEN", "timestamps"),
    ],
)
def test_a_planted_violation_is_found(tree_copy: Path, module: str, line: str, contract: str, named: str):
    plant(tree_copy, module, line + "  # noqa")
    result = lint_imports(tree_copy)
    assert contract in result.stdout, result.stdout
    assert named in result.stdout, result.stdout
    assert result.returncode != 0
