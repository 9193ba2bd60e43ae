"""The generated stubs import, and our inference.proto is TorchServe's, field for field."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from npas_serve.protocol import _codegen, inference_pb2, inference_pb2_grpc, npas_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"


def test_service_and_methods():
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"]
    assert service.full_name == SERVICE
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
               for m in service.methods}
    pkg = "org.pytorch.serve.grpc.inference."
    assert methods["Ping"] == ("google.protobuf.Empty", pkg + "TorchServeHealthResponse", False, False)
    assert methods["Predictions"] == (pkg + "PredictionsRequest", pkg + "PredictionResponse", False, False)
    assert methods["StreamPredictions"] == (pkg + "PredictionsRequest", pkg + "PredictionResponse", False, True)
    assert hasattr(inference_pb2_grpc, "InferenceAPIsServiceStub")
    assert hasattr(inference_pb2_grpc, "add_InferenceAPIsServiceServicer_to_server")


def test_npas_messages():
    fields = {f.name: f.number for f in npas_pb2.Tensor.DESCRIPTOR.fields}
    assert fields == {"data": 1, "shape": 2, "dtype": 3}
    optional = {f.name for f in npas_pb2.InferRequest.DESCRIPTOR.fields if f.has_presence}
    assert {"ensemble_size", "exit", "latency_budget_ms", "min_confidence", "deadline_unix_ms"} <= optional


def _torchserve_jar() -> Path | None:
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(list(spec.submodule_search_locations)[0], "frontend", "model-server.jar")
    return jar if jar.is_file() else None


def _descriptor(proto_dir: Path, tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile inference.proto in `proto_dir` with protoc; comments are dropped."""
    from grpc_tools import protoc

    out = tmp / f"{proto_dir.name}.pb"
    well_known = importlib.util.find_spec("grpc_tools").submodule_search_locations[0] + "/_proto"
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{ROOT / 'proto' / 'third_party'}", f"-I{well_known}",
                      f"--descriptor_set_out={out}", str(proto_dir / "inference.proto")])
    assert rc == 0
    return _without_json_names(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0])


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc fills in derived json_name; the descriptor embedded in generated code leaves it out."""
    def strip(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)
    strip(file.message_type)
    return file


def test_inference_proto_matches_torchserve(tmp_path):
    jar = _torchserve_jar()
    if jar is None:
        pytest.skip("torchserve is not installed: no model-server.jar to compare against")
    theirs_dir = tmp_path / "torchserve"
    theirs_dir.mkdir()
    with zipfile.ZipFile(jar) as z:
        (theirs_dir / "inference.proto").write_bytes(z.read("proto/inference.proto"))
    theirs, ours = _descriptor(theirs_dir, tmp_path), _descriptor(ROOT / "proto", tmp_path)
    # Whole-structure equality: package, imports, every message, field (name, number,
    # type, label, proto3 optional), map entry, oneof, service method and option.
    assert ours == theirs
    # And the stubs we ship were generated from that same structure.
    shipped = descriptor_pb2.FileDescriptorProto()
    inference_pb2.DESCRIPTOR.CopyToProto(shipped)
    assert shipped == theirs


def test_generate_into_fresh_folder(tmp_path):
    proto = shutil.copytree(ROOT / "proto", tmp_path / "proto")
    files = _codegen.generate(proto, tmp_path / "gen")
    assert sorted(p.name for p in files) == sorted(_codegen.OUTPUTS)
    stub = (tmp_path / "gen" / "inference_pb2_grpc.py").read_text()
    assert "from . import inference_pb2 as" in stub and "\nimport inference_pb2" not in stub
    assert not _codegen.is_stale(proto, tmp_path / "gen")
    later = (tmp_path / "gen" / "npas_pb2.py").stat().st_mtime + 10
    os.utime(proto / "npas.proto", (later, later))  # a newer .proto makes the outputs stale
    assert _codegen.is_stale(proto, tmp_path / "gen")
    (tmp_path / "gen" / "npas_pb2.py").unlink()
    assert _codegen.is_stale(tmp_path / "no-proto-here", tmp_path / "gen")


def test_source_checkout_regenerates_missing_stubs(tmp_path):
    """A checkout on sys.path with no _generated/ builds it on first import."""
    pkg = tmp_path / "npas_serve"
    shutil.copytree(ROOT / "npas_serve" / "protocol", pkg / "protocol",
                    ignore=shutil.ignore_patterns("_generated", "__pycache__"))
    (pkg / "__init__.py").write_text("")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    code = ("import npas_serve.protocol as p; "
            "print(p.npas_pb2.__file__); print(p.inference_pb2_grpc.InferenceAPIsServiceStub.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    generated_file, stub_name = out.stdout.split()
    assert Path(generated_file).resolve() == (pkg / "protocol" / "_generated" / "npas_pb2.py").resolve()
    assert stub_name == "InferenceAPIsServiceStub"
