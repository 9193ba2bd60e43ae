"""The Open Inference Protocol (KServe v2, as Triton speaks it) beside TorchServe's API.

`tensors` translates v2 tensors and parameters to the request `parse_request` validates
and answers back to named tensors; `model` holds the metadata and routing; `grpc_service`
is `inference.GRPCInferenceService` on the embedded gRPC server; `rest` the HTTP endpoints.
"""
