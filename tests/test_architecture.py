"""The import-linter contracts of pyproject.toml hold on this tree, and they do catch what they are for:
an upward import between layers, and an import cycle hidden inside a function."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports with the contracts of `tree`/pyproject.toml, on the `npas_serve` inside `tree`."""
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: install the dev extras (scripts/setup.sh)"
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
                          cwd=tree, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "npas_serve", tmp_path / "npas_serve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold_on_this_tree():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers(tree_copy):
    layers = tree_copy / "npas_serve" / "layers.py"
    layers.write_text(layers.read_text() + "\nimport npas_serve.engine  # noqa: E402,F401\n")
    done = lint_imports(tree_copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "npas_serve layers, top to bottom BROKEN" in done.stdout
    assert "npas_serve.layers -> npas_serve.engine" in done.stdout


def test_a_cycle_inside_a_function_is_caught(tree_copy):
    planner = tree_copy / "npas_serve" / "engine" / "planner.py"       # the engine imports the planner
    planner.write_text(planner.read_text() + "\n\ndef _late():\n    from npas_serve.engine import engine  # noqa: F401\n")
    done = lint_imports(tree_copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no import cycles between the modules of any package BROKEN" in done.stdout
    assert "npas_serve layers, top to bottom KEPT" in done.stdout


# serving never imports the training code: a separate contract catches an import of `npas_serve.train`
# from the engine or a server, even inside a function, which the layers contract allows (both sit above it)
CONTRACT = "serving never imports the training code"


@pytest.mark.parametrize("module", ["engine/planner.py", "servers/metrics.py", "servers/v2/rest.py"])
def test_serving_code_importing_train_breaks_the_contract(tmp_path, module):
    shutil.copytree(ROOT / "npas_serve", tmp_path / "npas_serve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    source = tmp_path / "npas_serve" / module
    late = "\n\ndef _late():\n    from npas_serve.train import TrainConfig  # noqa: F401\n"
    source.write_text(source.read_text() + late)
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{CONTRACT} BROKEN" in done.stdout
    assert "npas_serve layers, top to bottom KEPT" in done.stdout    # only the new contract sees it
