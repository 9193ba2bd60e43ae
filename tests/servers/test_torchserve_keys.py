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
