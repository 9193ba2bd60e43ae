"""The CIFAR-scale family: three wide ResNets of published shapes on one bank, an exit after each group."""
import json

import numpy as np
import pytest
import torch

from npas_serve.engine import Engine, EngineConfig
from npas_serve.families.wrn import wide_resnet
from npas_serve.family import FamilySpec, build_family
from npas_serve.layers import SharedConv2d
from npas_serve.train import TrainConfig, run_training


def conv_params(member) -> int:
    return sum(int(np.prod(m.weight_shape)) for m in member.modules() if isinstance(m, SharedConv2d))


def test_members_have_the_published_wrn_sizes_and_exits_after_each_group():
    family = build_family(FamilySpec(family="cifar-wrn"))
    assert family.names == ["wrn-16-4", "wrn-16-2", "wrn-10-4"] and family.num_exits == 3
    # WRN-16-4 holds 2.75M parameters (Zagoruyko & Komodakis, table 1); its convolutions here are 2.74M
    shared = dict(zip(family.names, family.member_shared_numel()))
    assert shared == {"wrn-16-4": 2_742_704, "wrn-16-2": 688_560, "wrn-10-4": 1_194_416}
    # one bank for all three, under the members' unshared total / 3
    assert family.generator.bank_numel() <= sum(shared.values()) / 3
    family.eval()
    with torch.no_grad():
        out = family(torch.randn(2, 3, 32, 32), members=[1])
    assert [o.shape for o in out[0]] == [(2, 10)] * 3


def test_depth_must_be_6n_plus_4():
    assert conv_params(wide_resnet(10, 1)) < conv_params(wide_resnet(16, 1)) < conv_params(wide_resnet(16, 2))
    with pytest.raises(ValueError, match="6n"):
        wide_resnet(12, 1)


def test_the_tiny_variant_trains_on_images_and_serves_them(tmp_path):
    from npas_serve.data.synthetic import synthetic_images

    x, y = synthetic_images(48, seed=1)
    np.savez(tmp_path / "images.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    family, manifest = run_training(FamilySpec(family="cifar-wrn-tiny"), TrainConfig(epochs=1, batch_size=16),
                                    tmp_path / "ckpt", data=str(tmp_path / "images.npz"), progress=False)
    assert manifest.example_shape == manifest.input_shape == [3, 32, 32]
    engine = Engine.load(tmp_path / "ckpt", EngineConfig(warmup_batch_sizes=(1,)))
    answer = engine.answer(engine.parse({"data": json.dumps({"inputs": x[40:42].tolist(), "mode": "anytime"})}))
    assert len(answer.predictions) == 2 and answer.exit_reached == 2
