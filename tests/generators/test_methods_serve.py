"""One interface: a checkpoint made with any method loads into the Engine and answers, frozen or not."""
import numpy as np
import pytest
import torch

from npas_serve.checkpoint import load_checkpoint
from npas_serve.cli import _method_arg, main
from npas_serve.engine import Engine, EngineConfig
from npas_serve.protocol import InferenceRequest

METHODS = {
    "superweights": [],
    "ssn": ["down=emb", "up=mask"],
    "arbnet": ["hash=neighborhood", "spread=1.5"],
}


@pytest.fixture(scope="module", params=list(METHODS))
def checkpoint(request, tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    args = ["train", "--family", "mnist1d-resnet-tiny", "--data", str(small_npz), "--epochs", "1",
            "--budget", "0.25", "--method", request.param, "--out", str(out), "--quiet", "--no-eval"]
    for kv in METHODS[request.param]:
        args += ["--method-arg", kv]
    assert main(args) == 0
    return request.param, out


def test_method_args_reach_the_manifest(checkpoint):
    method, out = checkpoint
    _, manifest = load_checkpoint(out)
    assert manifest.spec.method == method
    assert manifest.spec.method_kwargs == dict(_method_arg(kv) for kv in METHODS[method])


@pytest.mark.parametrize("freeze", [False, True])
def test_any_methods_checkpoint_serves(checkpoint, freeze):
    _, out = checkpoint
    family, manifest = load_checkpoint(out)
    engine = Engine(family, manifest, EngineConfig(warmup_batch_sizes=(1,), freeze=freeze))
    x = np.random.default_rng(0).normal(size=(3, 1, 40)).astype(np.float32)
    answer = engine.answer(InferenceRequest(inputs=x))
    assert len(answer.predictions) == 3 and answer.members_used
    np.testing.assert_allclose(answer.probabilities.sum(-1), 1.0, atol=1e-5)
    norm = manifest.normalisation
    with torch.no_grad():
        direct = torch.stack([e[-1].softmax(-1) for e in family(torch.from_numpy(norm.apply(x)))])
    order = [engine.names.index(n) for n in answer.members_used]
    np.testing.assert_allclose(answer.probabilities, direct[order].mean(0).numpy(), atol=1e-5)
    resident = engine.resident_bytes()
    assert (resident.frozen > 0) == freeze


def test_method_arg_values_are_typed():
    assert _method_arg("alpha=0.5") == ("alpha", 0.5)
    assert _method_arg("max_templates=4") == ("max_templates", 4)
    assert _method_arg("down=emb") == ("down", "emb")
    with pytest.raises(Exception, match="KEY=VALUE"):
        _method_arg("novalue")


def test_unknown_method_option_is_a_clean_cli_error(tmp_path, small_npz, capsys):
    code = main(["train", "--family", "mnist1d-resnet-tiny", "--data", str(small_npz), "--epochs", "1",
                 "--method", "arbnet", "--method-arg", "buckets=3", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "cannot take options ['buckets']" in capsys.readouterr().err
