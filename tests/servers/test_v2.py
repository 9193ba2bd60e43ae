"""The embedded server speaks KServe v2 to Triton's own clients, unmodified, over gRPC and REST."""
from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from npas_serve.client import Client
from npas_serve.data import load_dataset

CLIENTS = {"grpc": tgrpc, "http": thttp}


@pytest.fixture(scope="module")
def examples():
    data = load_dataset("mnist1d")
    return data.x_test[:8].astype(np.float32), data.y_test[:8]


@pytest.fixture(params=sorted(CLIENTS))
def triton(request, embedded):
    """(module, client) for one transport against the session's embedded server."""
    module = CLIENTS[request.param]
    url = embedded.target if module is tgrpc else embedded.http_target
    client = module.InferenceServerClient(url, network_timeout=60.0) if module is thttp else \
        module.InferenceServerClient(url)
    yield module, client
    client.close()


def infer(module, client, x, model="npas", datatype="FP32", **parameters):
    tensor = module.InferInput("inputs", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], parameters=parameters or None, client_timeout=60) \
        if module is tgrpc else client.infer(model, [tensor], parameters=parameters or None)


def params(module, result) -> dict:
    """The response's request-level parameters as plain values, whichever transport."""
    if module is thttp:
        return result.get_response()["parameters"]
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}


def test_health_and_metadata(triton, embedded):
    module, client = triton
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("npas")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("npas") if module is thttp else client.get_model_metadata("npas", as_json=True)
    tensors = lambda key: [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in meta[key]]  # noqa: E731
    assert meta["name"] == "npas" and meta["versions"] == ["1"]
    assert tensors("inputs") == [("inputs", "FP32", [-1, 40])]
    assert tensors("outputs") == [
        ("probabilities", "FP32", [-1, 10]), ("predictions", "INT64", [-1]), ("entropy", "FP32", [-1]),
        ("disagreement", "FP32", [-1])]


def test_every_ensemble_size_equals_the_torchserve_api(triton, embedded, examples):
    module, client = triton
    x, y = examples
    with Client(embedded.target, "npas", timeout=60) as ts:
        for k in range(1, embedded.num_members + 1):
            result = infer(module, client, x, ensemble_size=k)
            reference = ts.predict(x, ensemble_size=k)
            assert result.as_numpy("predictions").tolist() == reference.predictions
            np.testing.assert_allclose(result.as_numpy("probabilities"), reference.probabilities, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("entropy"), reference.entropy, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("disagreement"), reference.disagreement, atol=1e-6)
            p = params(module, result)
            assert p["members_used"].split(",") == reference.members_used and p["final"] is True
            assert p["mode"] == "ensemble" and "exit_reached" not in p
    # the trained tiny family is far above chance on these examples
    assert np.mean(result.as_numpy("predictions") == y) >= 0.5


def test_anytime_equals_the_torchserve_api(triton, embedded, examples):
    module, client = triton
    x, _ = examples
    with Client(embedded.target, "npas", timeout=60) as ts:
        for exit_ in range(embedded.num_exits):
            result = infer(module, client, x, mode="anytime", exit=exit_, members="mid")
            reference = ts.predict(x, mode="anytime", exit=exit_, members=["mid"])
            assert params(module, result)["exit_reached"] == reference.exit_reached == exit_
            assert result.as_numpy("predictions").tolist() == reference.predictions
            np.testing.assert_allclose(result.as_numpy("probabilities"), reference.probabilities, atol=1e-5)


def test_stream_infer_is_decoupled_one_response_per_exit(embedded, examples):
    """ModelStreamInfer: every refined answer of every request, in order per request (the requests of
    one stream run concurrently); a bad request is answered in-band and the stream goes on."""
    x, _ = examples
    answers: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(embedded.target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        tensor = tgrpc.InferInput("inputs", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_stream_infer("npas", [tensor], request_id="a", parameters={"mode": "anytime"},
                                  enable_empty_final_response=True)
        client.async_stream_infer("npas", [tensor], request_id="b", parameters={"mode": "sideways"})
        client.async_stream_infer("npas", [tensor], request_id="c", parameters={"ensemble_size": 2})
        got = [answers.get(timeout=60) for _ in range(embedded.num_exits + 1 + 2)]
    finally:
        client.stop_stream()
        client.close()
    assert answers.empty()
    by_id: dict[str, list] = {}
    for result, _ in got:
        if result is not None:
            by_id.setdefault(result.get_response().id, []).append(params(tgrpc, result))
    errors = [str(error) for result, error in got if result is None]
    assert len(errors) == 1 and "mode" in errors[0]
    assert sorted(by_id) == ["a", "c"]
    assert [p["exit_reached"] for p in by_id["a"]] == list(range(embedded.num_exits))
    assert [p["triton_final_response"] for p in by_id["a"]] == [False] * (embedded.num_exits - 1) + [True]
    assert [len(p["members_used"].split(",")) for p in by_id["c"]] == [1, 2]
    assert [p["final"] for p in by_id["c"]] == [False, True] and "triton_final_response" not in by_id["c"][-1]


def test_a_cancelled_stream_leaves_the_server_serving(embedded, examples):
    x, _ = examples
    big = np.repeat(x, 16, axis=0)                       # (128, 40): work still queued when cancelled
    client = tgrpc.InferenceServerClient(embedded.target)
    client.start_stream(callback=lambda result, error: None)
    tensor = tgrpc.InferInput("inputs", list(big.shape), "FP32")
    tensor.set_data_from_numpy(big)
    for i in range(6):
        client.async_stream_infer("npas", [tensor], request_id=f"r{i}")
    client.stop_stream(cancel_requests=True)
    try:
        assert client.is_server_ready()
        assert infer(tgrpc, client, x, ensemble_size=1).as_numpy("predictions").shape == (len(x),)
    finally:
        client.close()


BAD = [  # (what, infer kwargs, inputs, field named, gRPC status, HTTP status)
    ("wrong datatype", {"datatype": "BOOL"}, np.zeros((2, 40), bool), "datatype", "INVALID_ARGUMENT", "400"),
    ("wrong shape", {}, np.zeros((2, 41), np.float32), "inputs", "INVALID_ARGUMENT", "400"),
    ("unknown parameter", {"temperature": 2.0}, None, "temperature", "INVALID_ARGUMENT", "400"),
    ("knob out of range", {"ensemble_size": 99}, None, "ensemble_size", "INVALID_ARGUMENT", "400"),
    ("unknown model", {"model": "other"}, None, "model_name", "NOT_FOUND", "404"),
]


@pytest.mark.parametrize("what,kwargs,bad_x,field,grpc_status,http_status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_names_the_field_and_serving_goes_on(triton, examples, what, kwargs, bad_x, field,
                                                         grpc_status, http_status):
    module, client = triton
    x, _ = examples
    with pytest.raises(InferenceServerException) as err:
        infer(module, client, x if bad_x is None else bad_x, **kwargs)
    assert err.value.message().startswith(f"{field}: ")
    assert err.value.status() == (f"StatusCode.{grpc_status}" if module is tgrpc else http_status)
    assert infer(module, client, x, ensemble_size=1).as_numpy("predictions").shape == (len(x),)


def test_a_passed_deadline_is_a_gateway_timeout_not_a_crash(triton, examples):
    """A deadline already past is admitted, then refused by the queue with DeadlineExceeded: REST says
    504 and gRPC DEADLINE_EXCEEDED (not 500 / INTERNAL), naming the field; serving goes on."""
    module, client = triton
    x, _ = examples
    with pytest.raises(InferenceServerException) as err:
        infer(module, client, x, ensemble_size=1, deadline_unix_ms=1.0)      # 1970
    assert err.value.status() == ("StatusCode.DEADLINE_EXCEEDED" if module is tgrpc else "504")
    assert err.value.message().startswith("deadline_unix_ms: the deadline passed")
    assert infer(module, client, x, ensemble_size=1).as_numpy("predictions").shape == (len(x),)


def test_curl_style_json_request(embedded, examples):
    """Plain JSON over HTTP (no binary extension), as curl sends it; errors are {"error": ...}."""
    x, _ = examples
    url = f"http://{embedded.http_target}/v2/models/npas/infer"
    body = {"id": "q1", "parameters": {"ensemble_size": 2},
            "inputs": [{"name": "inputs", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "predictions"}]}
    with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["id"] == "q1" and [o["name"] for o in answer["outputs"]] == ["predictions"]
    assert len(answer["outputs"][0]["data"]) == len(x)
    body["inputs"][0]["datatype"] = "BYTES"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=60)
    assert err.value.code == 400 and json.loads(err.value.read())["error"].startswith("datatype: ")


def test_ready_only_while_the_engine_is_warm_and_its_scheduler_runs(served_checkpoint):
    """Readiness is the engine's: true once it answered its warm-up, false once its scheduler stopped."""
    import asyncio
    import threading

    from npas_serve.engine import Engine, EngineConfig
    from npas_serve.servers.v2.grpc_service import V2Servicer
    from npas_serve.servers.v2.model import Model
    from npas_serve.servers.v2.rest import create_rest_server

    engine = Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1,)))
    model = Model.of("npas", "1", engine.limits, engine.manifest.num_classes)
    rest = create_rest_server(engine, model, "127.0.0.1", 0)
    threading.Thread(target=rest.serve_forever, daemon=True).start()
    client = thttp.InferenceServerClient(f"127.0.0.1:{rest.server_address[1]}")
    servicer = V2Servicer(engine, model)
    try:
        assert engine.ready() and client.is_server_ready() and client.is_model_ready("npas")
        assert asyncio.run(servicer.ServerReady(None, None)).ready
        engine.close()
        assert not engine.ready() and not client.is_server_ready() and not client.is_model_ready("npas")
        assert not asyncio.run(servicer.ServerReady(None, None)).ready
        assert client.is_server_live()
    finally:
        client.close()
        rest.shutdown()
        engine.close()


def test_rest_refusals_keep_the_server_serving(embedded, examples):
    """Malformed JSON, a lying binary header, an oversized body and an unknown path are each one
    v2 error; a good request still gets its answer afterwards."""
    import http.client

    x, _ = examples
    host, port = embedded.http_target.split(":")
    header = json.dumps({"inputs": [{"name": "inputs", "shape": [1, 40], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 160}}]}).encode()
    cases = [  # (method, path, body, headers, status, field)
        ("POST", "/v2/models/npas/infer", b"{not json", {}, 400, "body"),
        ("POST", "/v2/models/npas/infer", header + x[:1].tobytes()[:100],
         {"Inference-Header-Content-Length": str(len(header))}, 400, "binary_data_size"),
        ("POST", "/v2/models/npas/infer", None, {"Content-Length": str(64 * 2**20)}, 413, "Content-Length"),
        ("GET", "/v2/models/npas/versions/7", None, {}, 404, "model_version"),
        ("GET", "/v3", None, {}, 404, "/v3"),
    ]
    for method, path, body, headers, status, field in cases:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.putrequest(method, path)      # headers only: an oversized body is refused by its length
            for key, value in {**({} if body is None else {"Content-Length": str(len(body))}), **headers}.items():
                conn.putheader(key, value)
            conn.endheaders(body)
            resp = conn.getresponse()
            assert resp.status == status, (path, resp.status)
            assert json.loads(resp.read())["error"].startswith(f"{field}"), path
        finally:
            conn.close()
    client = thttp.InferenceServerClient(embedded.http_target)
    try:
        assert infer(thttp, client, x).as_numpy("predictions").shape == (len(x),)
    finally:
        client.close()
