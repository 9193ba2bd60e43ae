"""Build hook: generate the protobuf/gRPC stubs from proto/ during build_py.

Everything else about the package lives in pyproject.toml. The generator is
loaded by file path because the isolated build environment has grpcio-tools
but none of npas_serve's runtime dependencies.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = ("npas_serve", "protocol", "_generated")


def _codegen():
    spec = importlib.util.spec_from_file_location("_npas_codegen", ROOT / "npas_serve/protocol/_codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """Wheels get the stubs in build_lib; editable installs get them beside the sources they import."""

    def run(self):
        super().run()
        target = ROOT.joinpath(*PACKAGE) if self.editable_mode else Path(self.build_lib, *PACKAGE)
        _codegen().generate(ROOT / "proto", target)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(Path(self.build_lib, *PACKAGE, name)) for name in _codegen().OUTPUTS]

    def get_output_mapping(self):
        # Lets `editable_mode=strict` link the generated files too.
        mapping = super().get_output_mapping()
        for name in _codegen().OUTPUTS if self.editable_mode else ():
            mapping[str(Path(self.build_lib, *PACKAGE, name))] = str(ROOT.joinpath(*PACKAGE, name))
        return mapping


setup(cmdclass={"build_py": BuildPyWithStubs})
