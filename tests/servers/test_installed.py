"""A non-editable install serves a model under TorchServe, with no checkout on the path.

The project is installed (`pip install --no-deps --no-build-isolation --target DIR`, from a
copy of the files an sdist carries, so nothing is written into the checkout) into a folder of
its own; every command then runs from an empty working directory with PYTHONPATH naming only
that folder, so the checkout cannot be imported by the CLI, the archiver or the TorchServe
worker. The dependencies come from this virtualenv (the editable install's finder comes after
PYTHONPATH, and the test checks which copy was imported).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from npas_serve.data import load_dataset
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SDIST_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proto", "npas_serve")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the project was installed into (its packages and bin/npas-serve)."""
    work = tmp_path_factory.mktemp("install")
    source, target = work / "source", work / "site"
    source.mkdir()
    for name in SDIST_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "_generated"))
        else:
            shutil.copy2(src, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return target


def run(installed: Path, cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([str(installed / "bin" / "npas-serve"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, "-c", "import npas_serve.servers.torchserve.handler as h; print(h.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip().splitlines()[-1]).is_relative_to(installed)
    assert (installed / "npas_serve" / "servers" / "torchserve" / "npas_handler.py").is_file()
    assert (installed / "npas_serve" / "protocol" / "_generated" / "inference_pb2.py").is_file()


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed; scripts/setup.sh installs it")
def test_archive_and_torchserve_start_answer_a_query(installed, served_checkpoint, tmp_path):
    cwd = tmp_path / "elsewhere"          # not the checkout: nothing of it is importable from here
    cwd.mkdir()
    made = run(installed, cwd, "archive", str(served_checkpoint), "--model-store", "model_store", timeout=240)
    assert made.returncode == 0, made.stderr[-2000:]
    mar = cwd / "model_store" / "npas.mar"
    with zipfile.ZipFile(mar) as zf:   # the handler file packed is the installed one
        packed = zf.read("npas_handler.py")
    assert packed == (installed / "npas_serve" / "servers" / "torchserve" / "npas_handler.py").read_bytes()

    ports = {flag: str(free_port()) for flag in ("--grpc-port", "--grpc-management-port", "--http-port",
                                                  "--management-port", "--metrics-port")}
    x = load_dataset("mnist1d").x_test[:4, None].astype(np.float32)
    np.save(cwd / "x.npy", x)
    try:
        started = run(installed, cwd, "torchserve", "start", "--model-store", "model_store", "--run-dir", "run",
                      "--timeout", "240", *(a for kv in ports.items() for a in kv), timeout=300)
        assert started.returncode == 0, started.stdout[-1000:] + started.stderr[-2000:]
        status = run(installed, cwd, "torchserve", "status", "--run-dir", "run", timeout=60)
        assert "READY" in status.stdout, status.stdout + status.stderr[-1000:]
        answered = run(installed, cwd, "query", "--target", f"127.0.0.1:{ports['--grpc-port']}",
                       "--token-file", "run/key_file.json", "--inputs", "x.npy", "--ensemble-size", "2",
                       timeout=120)
        assert answered.returncode == 0, answered.stderr[-2000:]
        assert answered.stdout.startswith("final: predictions [") and "members" in answered.stdout
    finally:
        stopped = run(installed, cwd, "torchserve", "stop", "--run-dir", "run", timeout=120)
    assert stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr[-1000:]
