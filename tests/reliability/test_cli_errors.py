"""One error line, exit status 2, where tracebacks or silent surprises used to be (issue 13, defects 5 and 9).

Each case runs the real CLI; `serve` cases that get as far as binding start a real server.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time

import numpy as np
import pytest
import torch

from tests.support.servers import CLI, free_port


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line(done: subprocess.CompletedProcess, words: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(("npas-serve: error:", "npas-serve ")) and words in last, done.stderr
    return re.sub(r"/\S+/", "", last)[:140]


def test_a_second_server_on_a_busy_port_fails_instead_of_sharing_it(embedded, served_checkpoint, figures):
    port = embedded.target.rsplit(":", 1)[1]
    done = cli("serve", str(served_checkpoint), "--grpc-port", port, "--metrics-port", "0")
    figures.put("cli_errors", "serve on a busy gRPC port", assert_one_line(done, "cannot bind gRPC"))


def test_serve_on_a_busy_metrics_port_is_one_line(served_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = cli("serve", str(served_checkpoint), "--grpc-port", "0", "--metrics-port",
                   str(busy.getsockname()[1]))
    assert_one_line(done, "cannot serve metrics")


@pytest.mark.parametrize("flags, words", [
    (["--host", "256.1.1.1"], "--host"),
    (["--grpc-port", "70000"], "--grpc-port"),
    (["--cache-bytes", "-1"], "--cache-bytes"),
])
def test_serve_refuses_bad_flags_before_loading(served_checkpoint, flags, words):
    started = time.monotonic()
    done = cli("serve", str(served_checkpoint), *flags)
    assert_one_line(done, words)
    assert time.monotonic() - started < 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_serve_on_cuda_without_a_gpu_blames_the_device(served_checkpoint):
    assert_one_line(cli("serve", str(served_checkpoint), "--device", "cuda"), "no CUDA device")


def test_archive_refuses_a_negative_cache_before_building(served_checkpoint, tmp_path):
    done = cli("archive", str(served_checkpoint), "--cache-bytes", "-1", "--model-store", str(tmp_path / "s"))
    assert_one_line(done, "--cache-bytes")
    assert not (tmp_path / "s").exists()


def test_train_into_a_file_is_refused_before_training(tmp_path, good_npz):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    started = time.monotonic()
    done = cli("train", "--family", "mnist1d-resnet-tiny", "--data", str(good_npz), "--epochs", "50",
               "--out", str(out), "--quiet")
    assert_one_line(done, "is a file")
    assert time.monotonic() - started < 60 and out.read_text() == "not a directory"


def test_query_with_an_object_array_is_one_line(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    done = cli("query", "--target", f"127.0.0.1:{free_port()}", "--inputs", str(path), "--timeout", "2")
    assert_one_line(done, "objects.npy")
