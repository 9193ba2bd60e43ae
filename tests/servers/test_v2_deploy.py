"""The KServe v2 predictor variant (deploy/k8s/kserve/*-v2.yaml) runs the embedded server with the
ports, flags and probes the code serves; its probes answer on a real embedded server."""
from __future__ import annotations

import shlex
import urllib.request

import yaml

from npas_serve.cli import build_parser
from npas_serve.servers.torchserve.launcher import Ports
from tests.support.deploy import DEPLOY

KSERVE = DEPLOY / "k8s" / "kserve"


def load(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


def test_v2_runtime_runs_the_embedded_server_with_rest_on_the_predictor_port():
    runtime, isvc = load("servingruntime-v2.yaml"), load("inferenceservice-v2.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    container = runtime["spec"]["containers"][0]
    command = shlex.split(container["args"][0].replace("${NPAS_MODEL}", "npas").replace("exec ", "", 1))
    assert command[0] == "npas-serve"
    args = build_parser().parse_args(command[1:])
    assert (args.host, args.grpc_port, args.metrics_port, args.http_port) == (
        "0.0.0.0", Ports.grpc, Ports.metrics, Ports.http)
    assert str(args.model).startswith("/mnt/models/")          # where KServe's storage initializer puts it
    assert [p["containerPort"] for p in container["ports"]] == [args.http_port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == args.http_port
    assert int(isvc["metadata"]["annotations"]["prometheus.kserve.io/port"]) == args.metrics_port


def test_the_probe_paths_answer_on_the_embedded_server(embedded):
    runtime = load("servingruntime-v2.yaml")["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        url = f"http://{embedded.http_target}{runtime[probe]['httpGet']['path']}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
