"""The command line as a user meets it: a subprocess, its exit code, stderr and what it leaves on disk."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = "mnist1d-resnet-tiny"


def npas(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "npas_serve.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("npas-serve: error: ")
    for word in words:
        assert word in lines[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_unknown_family(out, good_npz):
    result = npas("train", "--family", "no-such", "--data", good_npz, "--out", out)
    assert_user_error(result, "no-such", "mnist1d-resnet", "digits-cnn")
    assert not out.exists()


@pytest.mark.parametrize("budget, words", [
    ("0", ["budget"]), ("-1", ["budget"]), ("nan", ["budget"]), ("inf", ["budget"]),
])
def test_bad_budget(out, good_npz, budget, words):
    result = npas("train", "--family", TINY, "--data", good_npz, f"--budget={budget}", "--out", out)
    assert_user_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("count, words", [
    ("11", ["budget of 11 parameters is too small"]), ("0", ["budget_params", ">= 1"]),
])
def test_bad_budget_params(out, good_npz, count, words):
    result = npas("train", "--family", TINY, "--data", good_npz, f"--budget-params={count}", "--out", out)
    assert_user_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "nan"])
def test_bad_validation_fraction(out, good_npz, fraction):
    result = npas("train", "--family", TINY, "--data", good_npz, f"--validation={fraction}", "--out", out)
    assert_user_error(result, "validation fraction")
    assert not out.exists()


def test_budget_and_budget_params_together_are_refused(out, good_npz):
    result = npas("train", "--family", TINY, "--data", good_npz, "--budget", "0.5", "--budget-params", "5000",
                  "--out", out)
    assert_user_error(result, "not both")
    assert not out.exists()


def test_the_old_budget_count_still_works_with_a_note(out, good_npz):
    """`--budget N` with N > 10 was a parameter count; it still is, with a note naming --budget-params."""
    result = npas("train", "--family", TINY, "--data", good_npz, "--budget=11", "--out", out)
    assert result.returncode == 2, result.stderr
    note, error = result.stderr.splitlines()
    assert note.startswith("npas-serve: note: --budget 11 as a parameter count is deprecated")
    assert "--budget-params 11" in note
    assert error.startswith("npas-serve: error: ") and "budget of 11 parameters is too small" in error
    assert not out.exists()


def test_budget_params_sets_the_bank_size(out, good_npz):
    result = npas("train", "--family", TINY, "--data", good_npz, "--epochs", "1", "--budget-params", "3000",
                  "--quiet", "--no-eval", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget_params"] == 3000
    assert (manifest["spec"]["budget"], manifest["spec"]["budget_params"]) == (None, 3000)


def test_missing_npz(out, tmp_path):
    result = npas("train", "--family", TINY, "--data", tmp_path / "absent.npz", "--out", out)
    assert_user_error(result, "absent.npz", "does not exist")
    assert not out.exists()


def test_malformed_npz(out, tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    result = npas("train", "--family", TINY, "--data", junk, "--out", out)
    assert_user_error(result, "junk.npz", "not a readable .npz")
    assert not out.exists()


def test_labels_out_of_range_for_num_classes(out, good_npz):
    result = npas("train", "--family", TINY, "--data", good_npz, "--num-classes", "2", "--out", out)
    assert_user_error(result, "labels must lie in [0, 1]")
    assert not out.exists()


def test_eval_of_a_directory_that_is_not_a_checkpoint(tmp_path):
    result = npas("eval", tmp_path)
    assert_user_error(result, "manifest.json is missing")


def test_help_explains_the_commands():
    script = Path(sys.executable).parent / "npas-serve"      # the installed console script
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert "train" in result.stdout and "eval" in result.stdout and "bank" in result.stdout
    result = npas("train", "--help")
    assert result.returncode == 0
    for flag in ("--family", "--generator", "--generator-arg", "--budget", "--budget-params", "--data", "--out",
                 "--resume", "--num-classes"):
        assert flag in result.stdout


def test_a_good_npz_trains_and_leaves_a_checkpoint(out, good_npz):
    result = npas("train", "--family", TINY, "--data", good_npz, "--epochs", "1", "--quiet", "--validation", "0.25",
                  "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "trained 3 members" in result.stdout
    for name in ("manifest.json", "model.safetensors", "report.json", "ensemble.png", "anytime.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"] == str(good_npz) and manifest["num_classes"] == 3
    assert manifest["report"]["num_test"] == 40
    assert manifest["validation"]["fraction"] == 0.25 and manifest["validation"]["seed"] == 0
    # a second train into the same --out is refused and leaves the checkpoint alone
    before = (out / "model.safetensors").read_bytes()
    again = npas("train", "--family", TINY, "--data", good_npz, "--epochs", "1", "--quiet", "--out", out)
    assert_user_error(again, "--resume")
    assert (out / "model.safetensors").read_bytes() == before
