"""Serving never imports the training code: the import-linter contract that says so catches an import
of `npas_serve.train` from the engine or a server, even one inside a function, which the layers
contract allows (the engine and the servers sit above `train`)."""
from __future__ import annotations

import shutil

import pytest

from tests.test_architecture import ROOT, lint_imports

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
