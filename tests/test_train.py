import json

import pytest
import torch
from safetensors.torch import load_file

import npas_serve.train.run as run
from npas_serve.checkpoint import MANIFEST, TENSORS, sha256_file
from npas_serve.errors import UserError
from npas_serve.family import FamilySpec, build_family
from npas_serve.train import TRAIN_META, TRAIN_STATE, TrainConfig, batches, make_optimizer, run_training

TINY = "mnist1d-resnet-tiny"


def fit(out, data, epochs=2, resume=False, **cfg):
    return run_training(FamilySpec(family=TINY), TrainConfig(epochs=epochs, **cfg), out, data=str(data),
                        resume=resume, progress=False)


def assert_same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_training_writes_a_checkpoint_and_lowers_the_loss(tmp_path, small_npz):
    family, manifest = fit(tmp_path / "a", small_npz, epochs=3)
    for name in (MANIFEST, TENSORS, TRAIN_STATE, TRAIN_META):
        assert (tmp_path / "a" / name).is_file()
    meta = json.loads((tmp_path / "a" / TRAIN_META).read_text())
    assert meta["epoch"] == 3 and len(meta["losses"]) == 3
    assert meta["losses"][-1] < meta["losses"][0]
    assert manifest.num_classes == 3 and manifest.input_shape == [1, 40]
    assert manifest.sha256 == sha256_file(tmp_path / "a" / TENSORS)
    assert not family.training


def test_training_is_deterministic_on_cpu(tmp_path, small_npz):
    fit(tmp_path / "a", small_npz)
    fit(tmp_path / "b", small_npz)
    assert_same_tensors(tmp_path / "a" / TENSORS, tmp_path / "b" / TENSORS)
    assert sha256_file(tmp_path / "a" / TENSORS) == sha256_file(tmp_path / "b" / TENSORS)
    fit(tmp_path / "c", small_npz, seed=1)
    assert sha256_file(tmp_path / "c" / TENSORS) != sha256_file(tmp_path / "a" / TENSORS)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, small_npz, monkeypatch):
    fit(tmp_path / "straight", small_npz, epochs=2)

    save = run.save_checkpoint
    saved = []

    def save_then_die(*args, **kwargs):
        saved.append(save(*args, **kwargs))
        if len(saved) == 1:
            raise KeyboardInterrupt   # the run is killed right after its first checkpoint

    monkeypatch.setattr(run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "resumed", small_npz, epochs=2)
    monkeypatch.setattr(run, "save_checkpoint", save)
    assert json.loads((tmp_path / "resumed" / TRAIN_META).read_text())["epoch"] == 1
    assert sha256_file(tmp_path / "resumed" / TENSORS) != sha256_file(tmp_path / "straight" / TENSORS)

    fit(tmp_path / "resumed", small_npz, epochs=2, resume=True)
    assert_same_tensors(tmp_path / "straight" / TENSORS, tmp_path / "resumed" / TENSORS)
    assert_same_tensors(tmp_path / "straight" / TRAIN_STATE, tmp_path / "resumed" / TRAIN_STATE)
    straight = json.loads((tmp_path / "straight" / TRAIN_META).read_text())
    resumed = json.loads((tmp_path / "resumed" / TRAIN_META).read_text())
    assert resumed["epoch"] == 2 and resumed["losses"] == straight["losses"]


def test_resume_continues_a_finished_run_to_more_epochs(tmp_path, small_npz):
    """--epochs 1, then --resume --epochs 2: with a constant schedule, the same as 2 epochs straight."""
    fit(tmp_path / "straight", small_npz, epochs=2, schedule="constant")
    fit(tmp_path / "resumed", small_npz, epochs=1, schedule="constant")
    fit(tmp_path / "resumed", small_npz, epochs=2, schedule="constant", resume=True)
    assert_same_tensors(tmp_path / "straight" / TENSORS, tmp_path / "resumed" / TENSORS)


def test_refuses_to_overwrite_a_checkpoint(tmp_path, small_npz):
    fit(tmp_path / "a", small_npz, epochs=1)
    before = sha256_file(tmp_path / "a" / TENSORS)
    with pytest.raises(UserError, match="--resume"):
        fit(tmp_path / "a", small_npz, epochs=1)
    assert sha256_file(tmp_path / "a" / TENSORS) == before


def test_resume_without_a_checkpoint_fails(tmp_path, small_npz):
    with pytest.raises(UserError, match="not a checkpoint"):
        fit(tmp_path / "empty", small_npz, resume=True)


@pytest.mark.parametrize("cfg, problem", [
    ({"epochs": 0}, "epochs"), ({"optimizer": "lbfgs"}, "optimizer"), ({"schedule": "poly"}, "schedule"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"weight_decay": -1.0}, "weight decay"),
])
def test_bad_config_fails_before_writing(tmp_path, small_npz, cfg, problem):
    with pytest.raises(UserError, match=problem):
        run_training(FamilySpec(family=TINY), TrainConfig(**cfg), tmp_path / "out", data=str(small_npz),
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_num_classes_larger_than_the_labels_is_kept(tmp_path, small_npz):
    spec = FamilySpec(family=TINY, family_kwargs={"num_classes": 5})
    family, manifest = run_training(spec, TrainConfig(epochs=1), tmp_path / "a", data=str(small_npz),
                                    progress=False)
    assert manifest.num_classes == 5
    assert family(torch.zeros(2, 1, 40))[0][-1].shape == (2, 5)


def test_data_that_does_not_fit_the_family_fails_before_writing(tmp_path):
    import numpy as np

    path = tmp_path / "img.npz"
    np.savez(path, x=np.ones((20, 3, 8, 8), np.float32), y=np.arange(20) % 2)
    with pytest.raises(UserError, match="shape"):
        run_training(FamilySpec(family=TINY), TrainConfig(epochs=1), tmp_path / "out", data=str(path),
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_bank_decays_but_coefficients_norms_and_biases_do_not():
    family = build_family(FamilySpec(family=TINY, family_kwargs={"num_classes": 3, "in_channels": 1}))
    opt = make_optimizer(family, TrainConfig(weight_decay=0.05))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {id(p) for p in family.parameters()}
    assert {id(p) for p in family.generator.banks} <= decay
    assert {id(p) for p in family.generator.coefficients} <= no_decay
    for name, p in family.named_parameters():   # norms and biases
        if p.ndim == 1 and not name.startswith("generator."):
            assert id(p) in no_decay, name
    heads = [m.heads[0][-1].weight for m in family.members]
    assert {id(p) for p in heads} <= decay


def test_batches_depend_only_on_seed_and_epoch():
    a = batches(300, 128, seed=0, epoch=3)
    assert [len(b) for b in a] == [128, 128, 44]
    assert all(torch.equal(x, y) for x, y in zip(a, batches(300, 128, seed=0, epoch=3)))
    assert not torch.equal(a[0], batches(300, 128, seed=0, epoch=4)[0])
    assert sorted(torch.cat(a).tolist()) == list(range(300))
    assert [len(b) for b in batches(129, 128, 0, 0)] == [128]    # a batch of one is dropped (batch norm)
    # two processes split every global batch
    halves = [batches(300, 128, 0, 3, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), a[0])


def test_a_relative_data_path_is_stored_absolute(tmp_path, small_npz, monkeypatch):
    """`npas-serve eval` must find the data again from any working directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.npz").write_bytes(small_npz.read_bytes())
    monkeypatch.chdir(tmp_path)
    _, manifest = run_training(FamilySpec(family="mnist1d-resnet-tiny"), TrainConfig(epochs=1),
                               tmp_path / "out", data="data/mine.npz", progress=False)
    assert manifest.data == str(tmp_path / "data" / "mine.npz")
