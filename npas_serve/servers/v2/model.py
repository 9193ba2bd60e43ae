"""What the v2 endpoints say about the served model (metadata, routing), for gRPC and REST alike."""
from __future__ import annotations

from dataclasses import dataclass

from npas_serve.protocol.request import RequestError, RequestLimits
from npas_serve.servers.v2.tensors import INPUT, OUTPUTS

SERVER_NAME = "npas-serve"
PLATFORM = "npas-serve"


class ModelNotFound(RequestError):
    """A request for another model or version: NOT_FOUND over gRPC, 404 over REST."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]         # -1: any size (the batch)


@dataclass(frozen=True)
class Model:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, name: str, version: str, limits: RequestLimits, num_classes: int) -> "Model":
        """The input in the data's own example shape (the first the parser accepts), any batch."""
        example = tuple(limits.example_shapes[0]) if limits.example_shapes else tuple(limits.input_shape)
        shapes = {"probabilities": (-1, num_classes), "predictions": (-1,), "entropy": (-1,),
                  "disagreement": (-1,)}
        return cls(name, version, (TensorSpec(INPUT, "FP32", (-1, *example)),),
                   tuple(TensorSpec(o, OUTPUTS[o], shapes[o]) for o in OUTPUTS))

    def route(self, name: str, version: str = "") -> None:
        """Raise ModelNotFound unless the request names this model (and this version, or none)."""
        if name != self.name:
            raise ModelNotFound("model_name", f"model {name[:64]!r} is unknown; this server serves "
                                              f"{self.name!r}.")
        if version not in ("", self.version):
            raise ModelNotFound("model_version", f"version {version[:64]!r} of model {self.name!r} is "
                                                 f"unknown; it has {self.version!r}.")
