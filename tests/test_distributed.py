"""Training on several processes: `torchrun -m npas_serve.cli train` with DistributedDataParallel over gloo.

Two CPU processes, each given half of every global batch, must train the model one
process trains on the whole batch. SGD is used for the comparison because it passes
float32 rounding through unamplified: with global batch-norm statistics the two runs
differ by a few ulps (measured: 4e-7 at most, running variances included), while
per-rank statistics, what plain BatchNorm under DDP gives, move the weights by ~3e-3
after the same four steps. The tolerance, 1e-5, sits well between the two. (AdamW
divides by the root of the second moment, so parameters whose gradient is near zero
can turn rounding noise into steps of up to lr; there the runs agree to ~3e-4.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from npas_serve.checkpoint import TENSORS
from npas_serve.family import FamilySpec
from tests.support.servers import free_port
from npas_serve.train import TRAIN_META, GlobalBatchNorm, TrainConfig, run_training, sync_batchnorm

TINY = "mnist1d-resnet-tiny"
ARGS = ["--family", TINY, "--epochs", "1", "--batch-size", "64", "--optimizer", "sgd", "--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def even_npz(tmp_path_factory):
    """250 examples: the 200 training ones make batches of 64, 64, 64 and 8, all split evenly in two."""
    rng = np.random.default_rng(0)
    y = np.arange(250) % 3
    x = rng.normal(size=(250, 40)).astype(np.float32) + 2.0 * y[:, None]
    path = tmp_path_factory.mktemp("ddp") / "even.npz"
    np.savez(path, x=x, y=y)
    return path


def test_two_processes_train_what_one_process_trains(tmp_path, even_npz):
    run_training(FamilySpec(family=TINY), TrainConfig(epochs=1, batch_size=64, optimizer="sgd"),
                 tmp_path / "one", data=str(even_npz), progress=False)

    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "npas_serve.cli", "train", *ARGS, "--data", str(even_npz),
           "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 3 members") == 1, done.stdout   # rank 0 alone reports
    assert "with 2 processes" in done.stdout

    one, two = load_file(str(tmp_path / "one" / TENSORS)), load_file(str(tmp_path / "two" / TENSORS))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    loss_one = json.loads((tmp_path / "one" / TRAIN_META).read_text())["losses"]
    loss_two = json.loads((tmp_path / "two" / TRAIN_META).read_text())["losses"]
    assert loss_two == pytest.approx(loss_one, rel=1e-6)   # the global batches' loss, not rank 0's half


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4)))
    keys, bn = list(model.state_dict()), model[1]
    x = torch.randn(8, 1, 20)
    h = model[0](x)
    expected = nn.functional.batch_norm(h, torch.zeros(4), torch.ones(4), bn.weight, bn.bias, True)
    synced = sync_batchnorm(model)                 # replaced on the parent, nested ones too
    assert isinstance(synced[1], GlobalBatchNorm) and isinstance(synced[2][0], GlobalBatchNorm)
    assert synced[1].weight is bn.weight and synced[1].running_mean is bn.running_mean   # tensors shared
    assert list(synced.state_dict()) == keys                                           # checkpoints unchanged
    torch.testing.assert_close(synced[1](h), expected)
    assert synced[1].num_batches_tracked == 1
