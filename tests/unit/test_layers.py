"""The import layers and the absence of import circles are checked (import-linter's contracts in
pyproject.toml), and the check fails on a planted violation of each; the declared dependencies
match the imports (deptry)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # grimp finds the packages on the path: this copy's
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for name in ("unitoken", "components", "pipelines"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_the_layers_hold_and_nothing_imports_in_a_circle():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module,line,broken", [
    # the model layer reaching up into the registry (models:/ URIs resolved inside model code)
    ("unitoken/model/io.py", "import unitoken.registry.uris", "config/files -> model"),
    # two modules of one package importing each other
    ("unitoken/registry/common.py", "import unitoken.registry.versions", "no import circles"),
    # a function-local import counts as much as one at the top
    ("unitoken/tracking/store.py", "def _planted():\n    from unitoken.train import train", "config/files -> model"),
])
def test_a_planted_violation_fails_the_check(tmp_path, module, line, broken):
    root = _copy(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n\n{line}\n")
    done = _lint(root)
    assert done.returncode != 0
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout, done.stdout


def test_the_declared_dependencies_match_the_imports(tmp_path):
    """deptry: every package the code imports is declared (or first party), every declared one is
    used; and it fails when a module imports something undeclared."""
    done = subprocess.run([str(BIN / "deptry"), "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    root = _copy(tmp_path)
    with open(root / "unitoken" / "files.py", "a") as f:
        f.write("\n\ndef _planted():\n    import requests  # noqa: F401\n")
    done = subprocess.run([str(BIN / "deptry"), "."], cwd=root, capture_output=True, text=True)
    assert done.returncode != 0 and "requests" in done.stdout + done.stderr
