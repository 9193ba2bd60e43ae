"""`tritonclient.grpc` behind the npas `Client` surface (`predict` -> InferenceResponse), so the
load generator drives the KServe v2 endpoint exactly as it drives TorchServe's API."""
from __future__ import annotations

import time

import numpy as np
import tritonclient.grpc as tgrpc

from npas_serve.protocol.response import InferenceResponse


class V2Client:
    def __init__(self, target: str, model_name: str = "npas", timeout: float = 60.0):
        self.client, self.model_name, self.timeout = tgrpc.InferenceServerClient(target), model_name, timeout

    def predict(self, inputs: np.ndarray, fmt: str | None = None, request_id: str = "", **knobs) -> InferenceResponse:
        """One ModelInfer; `fmt` is TorchServe-API only (v2 tensors are raw) and ignored. None knobs are left out."""
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        tensor = tgrpc.InferInput("inputs", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        params = {k: ",".join(v) if isinstance(v, (list, tuple)) else v for k, v in knobs.items() if v is not None}
        if "deadline_unix_ms" in params:       # as npas_serve.client does: the server keeps the way in for the way back
            params.setdefault("sent_unix_ms", round(time.time() * 1000, 3))
        result = self.client.infer(self.model_name, [tensor], request_id=request_id, parameters=params or None,
                                   client_timeout=self.timeout)
        response = result.get_response()
        p = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        return InferenceResponse(
            request_id=response.id, model_name=response.model_name, model_version=response.model_version,
            mode=p["mode"], predictions=result.as_numpy("predictions").tolist(),
            probabilities=result.as_numpy("probabilities"), entropy=result.as_numpy("entropy").tolist(),
            disagreement=result.as_numpy("disagreement").tolist(), members_used=p["members_used"].split(","),
            exit_reached=p.get("exit_reached"), plan=p["plan"].split(","), latency_ms=p["latency_ms"],
            budget_ms=knobs.get("latency_budget_ms"), budget_met=p.get("budget_met"), final=p["final"])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "V2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
