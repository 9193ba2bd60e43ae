"""Safe model files, token auth and loopback binds, on both servers and through the CLI.

Both servers in this module serve a booby-trapped checkpoint: next to its
safetensors and manifest it holds Python files (one named like our handler,
one like our package, one like a module the TorchServe worker imports), pickles
and a requirements file, each of which leaves a marker file if it ever runs.
Unit-level refusals (tampered tensors, another family, pickles) are in
tests/test_checkpoint.py; here they go through `npas-serve archive` and `serve`.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from npas_serve.servers.torchserve.archive import HANDLER
from npas_serve.checkpoint import MANIFEST, TENSORS, sha256_file
from npas_serve.client import Client
from tests.reliability.support import (expected_answer, group_pids, is_loopback, listening_sockets, matches,
                                       raw_predict, torchserve_run)
from tests.serving_fixtures import running_embedded, running_torchserve
from tests.support.servers import CLI

PY_TRAPS = ("npas_handler.py", "handler.py", "model.py", "__init__.py", "setup.py", "sitecustomize.py",
            "yaml.py", "npas_serve/__init__.py")
PICKLE_TRAPS = ("model.pt", "model.pkl", "weights.bin")


class Trap:
    """Unpickling this creates a file: proof that something ran code from the model files."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def trapped_checkpoint(served_checkpoint, markers, tmp_path_factory) -> Path:
    """The shared checkpoint plus files that must never run; this module's servers serve this copy."""
    trapped = Path(shutil.copytree(served_checkpoint, tmp_path_factory.mktemp("trapped") / "ckpt"))
    for name in PY_TRAPS:
        (trapped / name).parent.mkdir(exist_ok=True)
        (trapped / name).write_text(f"open({str(markers / name.replace('/', '_'))!r}, 'w').write('ran')\n")
    for name in PICKLE_TRAPS:
        (trapped / name).write_bytes(pickle.dumps(Trap(markers / name)))
    (trapped / "requirements.txt").write_text("npas-trap-package-that-does-not-exist==0.0.1\n")
    return trapped


@pytest.fixture(scope="module")
def embedded(trapped_checkpoint):
    with running_embedded(trapped_checkpoint) as server:
        yield server


@pytest.fixture(scope="module")
def torchserve(trapped_checkpoint, tmp_path_factory):
    with running_torchserve(trapped_checkpoint, tmp_path_factory.mktemp("torchserve")) as server:
        yield server


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


# -- archives and serving never run checkpoint code -------------------------------------------

def assert_only_our_files(mar: Path) -> None:
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        assert zf.read("npas_handler.py") == HANDLER.read_bytes()     # ours, not the checkpoint's namesake
    assert names == {"npas_handler.py", TENSORS, MANIFEST, "npas_config.json", "model-config.yaml",
                     "MAR-INF/MANIFEST.json"}, names


def test_the_archive_torchserve_runs_holds_only_our_handler_and_the_checked_files(torchserve, markers):
    assert_only_our_files(torchserve_run(torchserve)[2] / "npas.mar")
    assert not list(markers.iterdir())


def test_the_archive_cli_packs_no_checkpoint_code(trapped_checkpoint, markers, tmp_path):
    done = cli("archive", str(trapped_checkpoint), "--model-store", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert_only_our_files(tmp_path / "npas.mar")
    assert not list(markers.iterdir())


def test_a_trapped_checkpoint_is_served_without_running_its_code(server, pool, reference, markers, figures):
    with Client(server.target, "npas", token=server.token, timeout=60) as c:
        for mode in ("ensemble", "anytime"):
            answer = c.predict(pool[:8], mode=mode)
            assert matches(answer, expected_answer(reference, pool[:8], mode=mode))
    ran = sorted(p.name for p in markers.iterdir())
    figures.put("model_files", f"trapped_checkpoint_{server.kind}",
                {"traps": len(PY_TRAPS) + len(PICKLE_TRAPS) + 1, "traps_that_ran": len(ran)})
    assert not ran, f"code from the checkpoint ran: {ran}"


# -- bad model files are refused by the CLI ---------------------------------------------------

def tamper(ckpt: Path, marker: Path) -> str:
    data = bytearray((ckpt / TENSORS).read_bytes())
    data[len(data) - 100] ^= 0x01
    (ckpt / TENSORS).write_bytes(bytes(data))
    return "sha256"


def other_family(ckpt: Path, marker: Path) -> str:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["spec"].update(family="mnist1d-resnet", groups=None)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return "family"


def pickled_tensors(ckpt: Path, marker: Path) -> str:
    torch.save({"weights": torch.zeros(2), "payload": Trap(marker)}, ckpt / TENSORS)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["sha256"] = sha256_file(ckpt / TENSORS)        # even with a matching hash
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return "pickle"


def pickle_file(ckpt: Path, marker: Path) -> str:
    """`serve model.pt`: a pickle handed over instead of a checkpoint directory."""
    torch.save({"payload": Trap(marker)}, ckpt / "model.pt")
    return "pickle"


def pickled_mar(ckpt: Path, marker: Path) -> str:
    """A hand-made .mar whose tensor file is a pickle."""
    pickled_tensors(ckpt, marker)
    with zipfile.ZipFile(ckpt / "evil.mar", "w") as zf:
        for name in (TENSORS, MANIFEST):
            zf.write(ckpt / name, name)
        zf.writestr("npas_config.json", "{}")
    return "pickle"


def _edit(ckpt: Path, change) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    change(manifest)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def classes_2e6(ckpt: Path, marker: Path) -> str:
    """Heads for 2 million classes: 2.9 GB allocated before the refusal, once."""
    _edit(ckpt, lambda m: (m.update(num_classes=2_000_000), m["spec"]["family_kwargs"].update(num_classes=2_000_000)))
    return "num_classes"


def classes_1e9(ckpt: Path, marker: Path) -> str:
    _edit(ckpt, lambda m: (m.update(num_classes=10**9), m["spec"]["family_kwargs"].update(num_classes=10**9)))
    return "num_classes"


def negative_shape(ckpt: Path, marker: Path) -> str:
    _edit(ckpt, lambda m: m.update(input_shape=[1, -40]))
    return "input_shape"


def malformed_report(ckpt: Path, marker: Path) -> str:
    _edit(ckpt, lambda m: m.update(report={"exits": "all good"}))
    return "report"


def zero_std(ckpt: Path, marker: Path) -> str:
    """std 0 was served, and answers held non-standard JSON NaN."""
    _edit(ckpt, lambda m: m["normalisation"].update(std=0.0))
    return "normalisation"


def zip_bomb(ckpt: Path, marker: Path) -> str:
    """A .mar whose tensor file inflates a thousandfold (the real one wrote 3.3 GB before refusing)."""
    with zipfile.ZipFile(ckpt / "bomb.mar", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(TENSORS, bytes(64 * 2**20))
        zf.write(ckpt / MANIFEST, MANIFEST)
        zf.writestr("npas_config.json", "{}")
    return "zip bomb"


@pytest.mark.parametrize("command, spoil, target", [
    ("archive", classes_2e6, "."), ("serve", classes_1e9, "."), ("serve", negative_shape, "."),
    ("archive", malformed_report, "."), ("serve", zero_std, "."), ("serve", zip_bomb, "bomb.mar"),
    ("archive", tamper, "."), ("serve", tamper, "."),
    ("archive", other_family, "."), ("serve", other_family, "."),
    ("archive", pickled_tensors, "."), ("serve", pickled_tensors, "."),
    ("serve", pickle_file, "model.pt"), ("serve", pickled_mar, "evil.mar"),
], ids=lambda v: getattr(v, "__name__", v))
def test_the_cli_refuses_bad_model_files(trained_tiny, tmp_path, command, spoil, target, figures):
    ckpt = Path(shutil.copytree(trained_tiny, tmp_path / "ckpt"))
    marker = tmp_path / "unpickled"
    words = spoil(ckpt, marker)
    extra = ["--model-store", str(tmp_path / "store")] if command == "archive" else ["--grpc-port", "0"]
    done = cli(command, str(ckpt / target), *extra)
    assert done.returncode == 2, (done.stdout, done.stderr)
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("npas-serve: error:") and words in error, error
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "the pickle was unpickled"
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())
    figures.put("model_files", f"cli_{command}_{spoil.__name__}",
                {"refused": True, "error": re.sub(r"/\S+/", "", error[len("npas-serve: error: "):])[:160]})


# -- token auth and loopback binds ------------------------------------------------------------

def test_torchserve_refuses_requests_without_the_inference_key(torchserve, pool, figures):
    from npas_serve.protocol.response import encode_request
    from npas_serve.servers.torchserve.keys import run_dir_key
    from tests.reliability.support import http_status

    run_dir, ports, _ = torchserve_run(torchserve)
    good = {"data": encode_request(pool[:2])}
    codes = {
        "no key": raw_predict(torchserve, good, meta=()).code,
        "wrong key": raw_predict(torchserve, good, meta=(("authorization", "Bearer not-the-key"),)).code,
        "management key": raw_predict(torchserve, good, meta=(
            ("authorization", f"Bearer {run_dir_key(run_dir, 'management')}"),)).code,
        "inference key": raw_predict(torchserve, good).code,
        "management API, no key (HTTP)": http_status(f"http://127.0.0.1:{ports.management}/models"),
        "management API, key (HTTP)": http_status(f"http://127.0.0.1:{ports.management}/models",
                                                  run_dir_key(run_dir, "management")),
    }
    figures.put("security", "torchserve_token_auth", codes)
    assert codes["no key"] == codes["wrong key"] == codes["management key"] == "PERMISSION_DENIED", codes
    assert codes["inference key"] == "OK"
    assert codes["management API, no key (HTTP)"] in (400, 401, 403) and codes["management API, key (HTTP)"] == 200


def test_servers_listen_on_loopback_only(server, figures):
    pids = group_pids(server.pid) if server.kind == "torchserve" else [server.pid]
    sockets = listening_sockets(pids)
    figures.put("security", f"listening_{server.kind}", sorted(f"{a}:{p}" for a, p in sockets))
    assert int(server.target.rsplit(":", 1)[1]) in {p for _, p in sockets}
    assert len(sockets) >= 2                           # gRPC and metrics at least
    assert all(is_loopback(a) for a, _ in sockets), sockets
