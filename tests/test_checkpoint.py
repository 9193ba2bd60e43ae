import json
import pickle

import numpy as np
import pytest
import torch

from npas_serve.checkpoint import (MANIFEST, TENSORS, load_checkpoint, load_tensors, read_manifest, save_tensors,
                                   sha256_file)
from npas_serve.errors import UserError


class Payload:
    """Unpickling this object creates a file: proof that a loader ran code from the model file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def edit_manifest(directory, change):
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_reload_gives_identical_predictions(trained_tiny_run):
    directory, trained, manifest = trained_tiny_run
    family, loaded = load_checkpoint(directory)
    assert loaded.member_names == trained.names == family.names
    assert loaded.spec.groups == manifest.spec.groups
    assert not family.training
    x = torch.from_numpy(manifest.normalisation.apply(np.random.default_rng(0).normal(size=(16, 1, 40))))
    trained.eval()
    with torch.no_grad():
        for a, b in zip(trained(x), family(x)):
            for ea, eb in zip(a, b):
                assert torch.equal(ea, eb)


def test_a_tampered_tensor_file_is_refused(tiny_copy):
    path = tiny_copy / TENSORS
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01      # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(tiny_copy)


def test_a_manifest_naming_another_family_is_refused(tiny_copy):
    edit_manifest(tiny_copy, lambda m: m["spec"].update(family="mnist1d-resnet"))
    with pytest.raises(UserError, match="family"):
        load_checkpoint(tiny_copy)
    # without the stored grouping too: the tensors still do not fit that family
    edit_manifest(tiny_copy, lambda m: m["spec"].update(groups=None))
    with pytest.raises(UserError, match="do not match the manifest's family 'mnist1d-resnet'"):
        load_checkpoint(tiny_copy)


def test_a_manifest_naming_an_unknown_family_is_refused(tiny_copy):
    edit_manifest(tiny_copy, lambda m: m["spec"].update(family="no-such-family"))
    with pytest.raises(UserError, match="unknown family 'no-such-family'"):
        load_checkpoint(tiny_copy)


def test_renamed_members_are_refused(tiny_copy):
    edit_manifest(tiny_copy, lambda m: m.update(member_names=["a", "b", "c"]))
    with pytest.raises(UserError, match="members"):
        load_checkpoint(tiny_copy)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_is_refused_without_being_unpickled(tiny_copy, tmp_path, how):
    marker = tmp_path / "code-ran"
    path = tiny_copy / TENSORS
    if how == "torch.save":
        torch.save({"weights": torch.zeros(2), "payload": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    # the manifest even carries the right sha256: the refusal must come from the format
    edit_manifest(tiny_copy, lambda m: m.update(sha256=sha256_file(path)))
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(tiny_copy)
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(path)         # handed the file itself
    assert not marker.exists()


def test_a_missing_manifest_is_refused(tiny_copy):
    (tiny_copy / MANIFEST).unlink()
    with pytest.raises(UserError, match=f"{MANIFEST} is missing"):
        load_checkpoint(tiny_copy)


def test_a_missing_tensor_file_is_refused(tiny_copy):
    (tiny_copy / TENSORS).unlink()
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(tiny_copy)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('{"format": "other/9"}', "format"),
    ('{"format": "npas-serve/1"}', "lacks"),
    ("[1, 2]", "format"),
])
def test_a_malformed_manifest_is_refused(tiny_copy, text, problem):
    (tiny_copy / MANIFEST).write_text(text)
    with pytest.raises(UserError, match=problem):
        read_manifest(tiny_copy)


def test_manifest_records_what_serving_needs(trained_tiny):
    manifest = read_manifest(trained_tiny)
    assert manifest.spec.family == "mnist1d-resnet-tiny"
    assert manifest.member_names == ["wide", "mid", "narrow"] and manifest.num_exits == 3
    assert manifest.input_shape == [1, 40] and manifest.num_classes == 10
    assert manifest.data == "mnist1d" and manifest.normalisation.std > 0
    assert manifest.sha256 == sha256_file(trained_tiny / TENSORS)
    assert len(manifest.spec.groups) == 27


def test_every_safetensors_header_length_loads(tmp_path):
    """A safetensors file starts with its header length; a low byte of 0x80 is not a pickle."""
    low_bytes = set()
    for n in range(1, 80):
        path = tmp_path / f"t{n}.safetensors"
        sha = save_tensors(path, {"w" * n: torch.arange(3.0)})
        low_bytes.add(path.read_bytes()[0])
        assert torch.equal(load_tensors(path, sha)["w" * n], torch.arange(3.0))
    assert 0x80 in low_bytes


def test_a_manifest_written_before_generator_and_budget_params_still_loads(tiny_copy):
    """Older manifests named the generator "method" and gave a count as a `budget` above 10."""
    manifest = read_manifest(tiny_copy)
    count = manifest.budget_params

    def to_old(d):
        spec = d["spec"]
        spec["method"], spec["method_kwargs"] = spec.pop("generator"), spec.pop("generator_kwargs")
        spec["budget"] = float(count)
        del spec["budget_params"]

    edit_manifest(tiny_copy, to_old)
    family, loaded = load_checkpoint(tiny_copy)
    assert loaded.spec.generator == manifest.spec.generator
    assert (loaded.spec.budget, loaded.spec.budget_params) == (None, count)
    assert family.budget_params == count
