"""The one reader of TorchServe's key_file.json: the key asked for, or one line saying what is wrong."""
from __future__ import annotations

import json

import pytest

from npas_serve.errors import UserError
from npas_serve.servers.torchserve.keys import KEY_FILE, read_key, run_dir_key

KEYS = {"management": {"key": "m-key", "expiration time": "x"}, "inference": {"key": "i-key", "expiration time": "x"},
        "API": {"key": "a-key"}}


def test_reads_each_kind_of_key(tmp_path):
    (tmp_path / KEY_FILE).write_text(json.dumps(KEYS))
    assert [read_key(tmp_path / KEY_FILE, kind) for kind in ("inference", "management", "API")] == [
        "i-key", "m-key", "a-key"]
    assert run_dir_key(tmp_path) == "i-key" and run_dir_key(tmp_path, "management") == "m-key"


def test_a_run_dir_without_a_key_file_has_no_key(tmp_path):
    assert run_dir_key(tmp_path) is None


@pytest.mark.parametrize("content, says", [
    (None, "does not exist"),
    ("dir", "is a directory"),
    ("{not json", "holds no inference key"),
    (json.dumps({"management": {"key": "m"}}), "holds no inference key"),
    (json.dumps({"inference": "flat"}), "holds no inference key"),
])
def test_a_bad_key_file_is_one_user_error(tmp_path, content, says):
    path = tmp_path / KEY_FILE
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=says) as err:
        read_key(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "directory", "no inference key"])
def test_query_with_a_bad_token_file_is_one_line_and_status_2(tmp_path, kind):
    import subprocess
    import sys

    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 40), dtype=np.float32))
    key_file = tmp_path / KEY_FILE
    if kind == "directory":
        key_file.mkdir()
    elif kind == "no inference key":
        key_file.write_text(json.dumps({"management": {"key": "m"}}))
    done = subprocess.run([sys.executable, "-m", "npas_serve.cli", "query", "--inputs", str(tmp_path / "x.npy"),
                           "--token-file", str(key_file), "--target", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("npas-serve")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("npas-serve: error: ") and str(key_file) in lines[0]
