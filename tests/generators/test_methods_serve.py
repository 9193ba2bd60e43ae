"""One interface: a checkpoint made with any method loads into the Engine and answers, frozen or not,
its stages traced."""
import numpy as np
import pytest
import torch

from npas_serve.checkpoint import load_checkpoint
from npas_serve.cli import _generator_arg, main
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
            "--budget", "0.25", "--generator", request.param, "--out", str(out), "--quiet", "--no-eval"]
    for kv in METHODS[request.param]:
        args += ["--generator-arg", kv]
    assert main(args) == 0
    return request.param, out


def test_method_args_reach_the_manifest(checkpoint):
    method, out = checkpoint
    _, manifest = load_checkpoint(out)
    assert manifest.spec.generator == method
    assert manifest.spec.generator_kwargs == dict(_generator_arg(kv) for kv in METHODS[method])


@pytest.mark.parametrize("freeze", [False, True])
def test_any_methods_checkpoint_serves(checkpoint, freeze):
    _, out = checkpoint
    family, manifest = load_checkpoint(out)
    engine = Engine(family, manifest, EngineConfig(warmup_batch_sizes=(1,), freeze=freeze))
    assert engine._stages.traces.eager_stages == []     # every method's stages run as traces
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
    assert _generator_arg("alpha=0.5") == ("alpha", 0.5)
    assert _generator_arg("max_templates=4") == ("max_templates", 4)
    assert _generator_arg("down=emb") == ("down", "emb")
    with pytest.raises(Exception, match="KEY=VALUE"):
        _generator_arg("novalue")


def test_unknown_method_option_is_a_clean_cli_error(tmp_path, small_npz, capsys):
    code = main(["train", "--family", "mnist1d-resnet-tiny", "--data", str(small_npz), "--epochs", "1",
                 "--generator", "arbnet", "--generator-arg", "buckets=3", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "cannot take options ['buckets']" in capsys.readouterr().err


def test_the_old_method_flags_still_work_with_a_one_line_note(tmp_path, small_npz, capsys):
    out = tmp_path / "old"
    code = main(["train", "--family", "mnist1d-resnet-tiny", "--data", str(small_npz), "--epochs", "1",
                 "--budget", "0.25", "--method", "ssn", "--method-arg", "down=emb", "--method-arg", "up=mask",
                 "--out", str(out), "--quiet", "--no-eval"])
    assert code == 0
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["npas-serve: note: --method is deprecated; use --generator",
                     "npas-serve: note: --method-arg is deprecated; use --generator-arg"]
    _, manifest = load_checkpoint(out)
    assert manifest.spec.generator == "ssn" and manifest.spec.generator_kwargs == {"down": "emb", "up": "mask"}
