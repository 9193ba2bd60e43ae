"""User families: a builder in the user's own file, trained, saved with its source, and loaded only when trusted."""
import hashlib
import json
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from npas_serve.checkpoint import MANIFEST, UntrustedCodeError, load_checkpoint, read_manifest
from npas_serve.engine import Engine, EngineConfig
from npas_serve.errors import UserError
from npas_serve.families.user import CODE_FILE, UserCode, family_name, is_reference, read_reference
from npas_serve.family import FamilySpec, share
from npas_serve.protocol.request import RequestError
from npas_serve.train import TrainConfig, fit, run_training, save
from tests.test_cli import assert_user_error, npas

BUILDER = '''
from torch import nn


class MyConv(nn.Conv1d):
    """A subclass of a supported layer: converted like its base."""


def build_members(num_classes=3, in_channels=1):
    def net(width):
        return nn.Sequential(MyConv(in_channels, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return {"wide": net(8), "narrow": net(4)}
'''

TRAP = '''
import pathlib
pathlib.Path(MARKER).write_text("module body ran")
''' + BUILDER.replace('def build_members(num_classes=3, in_channels=1):', '''def build_members(num_classes=3, in_channels=1):
    pathlib.Path(MARKER).write_text("builder ran")''')


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory, small_npz) -> Path:
    """The builder above, trained one epoch on (N, 40) signals, from its own file."""
    root = tmp_path_factory.mktemp("user")
    (root / "families.py").write_text(BUILDER)
    spec = FamilySpec(family=f"{root / 'families.py'}:build_members", budget=0.5)
    run_training(spec, TrainConfig(epochs=1, batch_size=32), root / "ckpt", data=str(small_npz), progress=False)
    return root / "ckpt"


def trapped_copy(checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy whose code (and the manifest's record of it, as an attacker would write both) writes a marker."""
    marker = tmp_path / "ran.txt"
    target = tmp_path / "trapped"
    target.mkdir()
    for path in checkpoint.iterdir():     # tensors, manifest, training state (for --resume)
        (target / path.name).write_bytes(path.read_bytes())
    source = TRAP.replace("MARKER", repr(str(marker))).encode()
    (target / CODE_FILE).write_bytes(source)
    manifest = json.loads((target / MANIFEST).read_text())
    code = UserCode("build_members", hashlib.sha256(source).hexdigest(), "families.py:build_members")
    manifest["code"] = {"entry": code.entry, "sha256": code.sha256, "origin": code.origin}
    manifest["spec"]["family"] = family_name(code)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target, marker


def test_the_checkpoint_carries_the_builders_source_and_the_datas_example_shape(user_checkpoint):
    manifest = read_manifest(user_checkpoint)
    source = (user_checkpoint / CODE_FILE).read_bytes()
    assert source == BUILDER.encode()
    assert manifest.code.sha256 == hashlib.sha256(source).hexdigest() and manifest.code.entry == "build_members"
    assert manifest.spec.family == family_name(manifest.code)
    assert manifest.example_shape == [40] and manifest.input_shape == [1, 40]
    family, _ = load_checkpoint(user_checkpoint, trust_code=True)
    assert family.names == ["wide", "narrow"] and len(family.slots) == 4   # MyConv and Linear, per member


def test_a_checkpoint_with_code_is_refused_without_trust_and_nothing_of_it_runs(user_checkpoint, tmp_path):
    trapped, marker = trapped_copy(user_checkpoint, tmp_path)
    with pytest.raises(UntrustedCodeError, match="--trust-code"):
        load_checkpoint(trapped)
    with pytest.raises(UntrustedCodeError):
        Engine.load(trapped, EngineConfig(warmup_batch_sizes=(1,)))
    from npas_serve.servers.torchserve.archive import build_archive
    with pytest.raises(UntrustedCodeError):
        build_archive(trapped, "trapped", tmp_path / "store")
    assert not (tmp_path / "store" / "trapped.mar").exists()
    for command in (["eval", trapped], ["serve", trapped, "--grpc-port", "1", "--metrics-port", "2"],
                    ["archive", trapped, "--model-store", tmp_path / "store"],
                    ["train", "--resume", "--out", trapped, "--quiet"]):
        assert_user_error(npas(*command), "carries Python code", "--trust-code")
    assert not marker.exists()
    load_checkpoint(trapped, trust_code=True)     # the opt-in does run it: the marker proves the test can fail
    assert marker.exists()


def test_changed_code_is_refused_even_when_trusted(user_checkpoint, tmp_path):
    target = tmp_path / "changed"
    target.mkdir()
    for name in ("model.safetensors", MANIFEST, CODE_FILE):
        (target / name).write_bytes((user_checkpoint / name).read_bytes())
    (target / CODE_FILE).write_text(BUILDER + "\nimport os\n")
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(target, trust_code=True)


def test_an_archive_carries_the_code_and_the_trust_given_to_archive(user_checkpoint, tmp_path):
    from npas_serve.servers.torchserve.archive import CONFIG, build_archive, extract_archive

    mar = build_archive(user_checkpoint, "mine", tmp_path / "store", trust_code=True)
    with zipfile.ZipFile(mar) as zf:
        assert zf.read(CODE_FILE) == BUILDER.encode()
        config = json.loads(zf.read(CONFIG))
    assert config["trust_code"] is True
    # what the TorchServe worker does with the archive's config: serves (B, 40) batches
    (tmp_path / "unpacked").mkdir()
    unpacked = extract_archive(mar, tmp_path / "unpacked")
    engine = Engine.load(unpacked, EngineConfig(**{**config, "warmup_batch_sizes": (1,)}))
    x = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    assert len(engine.answer(engine.parse({"data": json.dumps({"inputs": x.tolist()})})).predictions) == 2
    # the same archive's config without the field: the worker refuses to run the code
    with pytest.raises(UntrustedCodeError, match="archive --trust-code"):
        Engine.load(unpacked, EngineConfig(**{**config, "trust_code": False, "warmup_batch_sizes": (1,)}))


def test_requests_come_in_the_datas_example_shape_with_the_channel_axis_as_an_alias(user_checkpoint):
    engine = Engine.load(user_checkpoint, EngineConfig(trust_code=True, warmup_batch_sizes=(1,)))
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    answers = [engine.answer(engine.parse({"data": json.dumps({"inputs": batch.tolist()})})).predictions
               for batch in (x, x[:, None])]
    assert answers[0] == answers[1] and len(answers[0]) == 3
    with pytest.raises(RequestError, match=r"expected \(B, 40\) or \(B, 1, 40\)"):
        engine.parse({"data": json.dumps({"inputs": x[:, :20].tolist()})})


def test_references_name_a_file_or_a_module_and_bad_ones_are_user_errors(tmp_path, monkeypatch):
    assert is_reference("path/to/f.py:build") and is_reference("pkg.mod:build")
    assert not is_reference("mnist1d-resnet") and not is_reference(family_name(UserCode("b", "0" * 64, "x")))
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fams.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    source, code = read_reference("mypkg.fams:build_members")
    assert source == BUILDER.encode() and code.entry == "build_members"
    for bad, words in (("nothere.py:build", "does not exist"), ("mypkg.fams:", "expected"),
                       ("no_such_module_xyz:build", "module")):
        with pytest.raises(UserError, match=words):
            read_reference(bad)


def test_a_builder_that_is_missing_or_returns_no_modules_is_a_user_error(tmp_path, small_npz):
    (tmp_path / "f.py").write_text("def build():\n    return 42\n")
    for ref, words in ((f"{tmp_path / 'f.py'}:other", "no function 'other'"), (f"{tmp_path / 'f.py'}:build", "returned int")):
        with pytest.raises(UserError, match=words):
            run_training(FamilySpec(family=ref), TrainConfig(epochs=1), tmp_path / "out", data=str(small_npz),
                         progress=False)
    assert not (tmp_path / "out").exists()


def test_python_path_share_fit_save_and_serve(tmp_path, small_npz):
    (tmp_path / "models.py").write_text(BUILDER)
    sys.path.insert(0, str(tmp_path))
    try:
        from models import build_members    # the user's own module, as their script imports it
    finally:
        sys.path.remove(str(tmp_path))
    models = build_members()
    family = share(list(models.values()), budget=0.5, names=list(models))
    manifest = fit(family, str(small_npz), TrainConfig(epochs=1, batch_size=32))
    assert manifest.example_shape == [40] and manifest.input_shape == [1, 40]
    with pytest.raises(UserError, match="builder="):
        save(family, tmp_path / "ckpt", manifest)
    save(family, tmp_path / "ckpt", manifest, builder=f"{tmp_path / 'models.py'}:build_members")
    with pytest.raises(UntrustedCodeError):
        Engine.load(tmp_path / "ckpt")
    engine = Engine.load(tmp_path / "ckpt", EngineConfig(trust_code=True, warmup_batch_sizes=(1,)))
    x = torch.randn(2, 40)
    expected = torch.stack([out[-1].softmax(-1) for out in family.eval()(
        torch.from_numpy(manifest.normalisation.apply(x[:, None].numpy())))]).mean(0).argmax(-1)
    answer = engine.answer(engine.parse({"data": json.dumps({"inputs": x.tolist()})}))
    assert answer.predictions == expected.tolist()


def test_save_refuses_a_builder_whose_members_differ(tmp_path, small_npz):
    (tmp_path / "other.py").write_text(BUILDER.replace("net(8)", "net(6)"))
    exec(compile(BUILDER, "builder", "exec"), scope := {})
    family = share(list(scope["build_members"]().values()), budget=0.5, names=["wide", "narrow"])
    manifest = fit(family, str(small_npz), TrainConfig(epochs=1, batch_size=64))
    with pytest.raises(UserError, match="differ"):
        save(family, tmp_path / "ckpt", replace(manifest), builder=f"{tmp_path / 'other.py'}:build_members")


def test_data_the_family_cannot_take_fails_before_anything_is_written(tmp_path):
    (tmp_path / "families.py").write_text(BUILDER)
    np.savez(tmp_path / "images.npz", x=np.zeros((20, 3, 8, 8)), y=np.arange(20) % 3)
    with pytest.raises(UserError, match=r"shape \(3, 8, 8\); this family takes 1-D signals"):
        run_training(FamilySpec(family=f"{tmp_path / 'families.py'}:build_members"), TrainConfig(epochs=1),
                     tmp_path / "out", data=str(tmp_path / "images.npz"), progress=False)
    with pytest.raises(UserError, match="pass --data"):
        run_training(FamilySpec(family=f"{tmp_path / 'families.py'}:build_members"), TrainConfig(epochs=1),
                     tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_registered_family_fitted_from_python_saves_without_code_or_trust(tmp_path, small_npz):
    from npas_serve.family import build_family

    family = build_family(FamilySpec(family="mnist1d-resnet-tiny", family_kwargs={"num_classes": 3}))
    manifest = fit(family, str(small_npz), TrainConfig(epochs=1, batch_size=64))
    save(family, tmp_path / "ckpt", manifest)
    assert not (tmp_path / "ckpt" / CODE_FILE).exists() and read_manifest(tmp_path / "ckpt").code is None
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), family.state_dict().values()))
