"""Generate the protobuf and gRPC modules from `proto/` into `_generated/`.

Used by `setup.py` (build time, loaded by file path because the build
environment has grpcio-tools but not torch or numpy) and by
`npas_serve.protocol` (a source checkout on sys.path). So it imports nothing
from npas_serve and nothing beyond the standard library at module level.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

PROTOS = ("inference.proto", "npas.proto")
MODULES = ("inference_pb2", "inference_pb2_grpc", "npas_pb2")
OUTPUTS = ("__init__.py",) + tuple(f"{m}.py" for m in MODULES) + ("inference_pb2.pyi", "npas_pb2.pyi")

# protoc writes `import inference_pb2 as inference__pb2` into the gRPC stub,
# which only works with _generated/ itself on sys.path; make it package-relative.
_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def is_stale(proto_dir: Path, out_dir: Path) -> bool:
    """True when an output is missing, or older than a .proto we can see."""
    outputs = [out_dir / name for name in OUTPUTS]
    if not all(p.is_file() for p in outputs):
        return True
    sources = [proto_dir / name for name in PROTOS if (proto_dir / name).is_file()]
    if not sources:  # installed wheel: no proto/ beside it, the outputs are the truth
        return False
    return max(p.stat().st_mtime for p in sources) > min(p.stat().st_mtime for p in outputs)


def generate(proto_dir: Path, out_dir: Path) -> list[Path]:
    """Run protoc on PROTOS and move the results into `out_dir` atomically.

    Files are written to a temporary folder first and then `os.replace`d, so
    two processes generating at once (test workers, server workers) never see
    a half-written module.
    """
    from grpc_tools import protoc  # only needed when generating
    import importlib.resources

    proto_dir, out_dir = Path(proto_dir).resolve(), Path(out_dir)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # third_party/ holds a stand-in for google/rpc/status.proto, which the
    # build environment lacks; protoc only needs its message name, and at run
    # time the generated code imports the real one (googleapis-common-protos).
    includes = [proto_dir, proto_dir / "third_party", Path(str(well_known))]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".protoc-") as tmp:
        args = ["grpc_tools.protoc", *(f"-I{d}" for d in includes),
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                *(str(proto_dir / name) for name in PROTOS)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTOS)} in {proto_dir}")
        stub = Path(tmp, "inference_pb2_grpc.py")
        stub.write_text(_BARE_IMPORT.sub(r"from . import \1 as \2", stub.read_text()))
        Path(tmp, "__init__.py").write_text('"""Generated from proto/ by _codegen.py; do not edit."""\n')
        unwanted = set(os.listdir(tmp)) - set(OUTPUTS)  # e.g. npas_pb2_grpc.py (no service)
        for name in unwanted:
            os.remove(Path(tmp, name))
        for name in OUTPUTS:
            os.replace(Path(tmp, name), out_dir / name)
    return [out_dir / name for name in OUTPUTS]

