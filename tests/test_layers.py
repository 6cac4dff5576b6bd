"""The layers contract of `make lint` (pyproject [tool.importlinter]) holds, and fails
on an import against the grain.

The second test runs the same tool and contract on a copy of the tree with one
upward import planted, so a contract that cannot fail (a layer list that names no
real package, a tool that finds nothing) shows here as a passing check on a broken tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


def _lint(where: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on sys.path: the copy's packages shadow the editable install's.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def _copy_tree(dest: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for package in _packages():
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )


def test_every_layer_names_a_package_of_the_tree() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contract, siblings = config["tool"]["importlinter"]["contracts"]
    assert set(siblings["ancestors"]) == set(_packages())
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    assert named == set(_packages())
    for package in named:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_fails_the_lint(tmp_path: Path) -> None:
    """privacy/ importing the composition root is a cycle between packages."""
    _copy_tree(tmp_path)
    clock = tmp_path / "privacy" / "clock.py"
    clock.write_text(clock.read_text(encoding="utf-8") + "\nimport softrelay.app  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "privacy.clock -> softrelay.app" in result.stdout


def test_two_modules_importing_each_other_fail_the_lint(tmp_path: Path) -> None:
    """A circle inside one package (once crashreports' worker and workers modules)."""
    _copy_tree(tmp_path)
    worker = tmp_path / "crashreports" / "worker.py"
    worker.write_text(
        worker.read_text(encoding="utf-8") + "\nimport crashreports.workers  # noqa\n"
    )
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "- .workers -> .worker" in result.stdout
