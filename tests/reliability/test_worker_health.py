"""A TorchServe worker survives every call, and readiness means a worker answers (issue 13, defect 1).

TorchServe 0.12 does not tell its worker whether a gRPC call is `Predictions` or
`StreamPredictions`; a second message to a unary call made the frontend drop the worker
for good while every health check still said READY. Now each call gets one message, and
readiness (`torchserve status`, the Docker healthcheck, the Kubernetes probes) is a request
the worker itself answers, so it fails while the worker cannot answer.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from npas_serve.client import Client
from npas_serve.protocol.response import decode_response, encode_request
from npas_serve.servers.torchserve import launcher as ts
from tests.reliability.support import expected_answer, matches, raw_predict, torchserve_run, worker_pids
from tests.support.servers import CLI
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


def test_stream_true_in_a_unary_call_costs_no_worker(torchserve, pool, reference, figures):
    x = pool[:4]
    workers = worker_pids(torchserve)
    reply = raw_predict(torchserve, {"data": encode_request(x, "json", stream=True)})
    assert reply.code == "OK", reply
    answer = decode_response(reply.prediction)
    assert answer.final and matches(answer, expected_answer(reference, x))
    with Client(torchserve.target, token=torchserve.token, timeout=5) as client:   # the issue's own reproduction
        assert client.predict(x, stream=True, mode="anytime").final
        started = time.monotonic()
        good = client.predict(x, ensemble_size=2)
        took = time.monotonic() - started
        assert took < 5
    assert matches(good, expected_answer(reference, x, ensemble_size=2))
    assert worker_pids(torchserve) == workers, "a call cost the TorchServe worker"
    figures.put("worker_health", "stream_true_in_unary_call", {
        "answer": "one final answer", "next_good_request_s": round(took, 3), "same_worker": True})


def probes(run_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    status = subprocess.run([*CLI, "torchserve", "status", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=60)
    health = subprocess.run([sys.executable, str(HEALTHCHECK), "torchserve", str(run_dir)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    return {"status": status, "healthcheck": health}


def test_readiness_fails_while_no_worker_can_answer(torchserve, figures):
    run_dir, ports, _ = torchserve_run(torchserve)
    assert all(p.returncode == 0 for p in probes(run_dir).values()), probes(run_dir)
    (worker,) = worker_pids(torchserve)
    os.kill(worker, signal.SIGSTOP)           # alive, listed READY, answers nothing
    try:
        assert "READY" in ts.worker_states(run_dir, "npas", ports)   # what the old check went by
        stopped = probes(run_dir)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert stopped["status"].returncode == 1 and "NOT READY" in stopped["status"].stdout, stopped["status"]
    assert stopped["healthcheck"].returncode == 1, stopped["healthcheck"]
    resumed = time.monotonic()
    assert wait_until(lambda: all(p.returncode == 0 for p in probes(run_dir).values()), 60)
    figures.put("worker_health", "worker_stopped", {
        "worker_list_said": "READY", "status_exit": stopped["status"].returncode,
        "healthcheck_exit": stopped["healthcheck"].returncode,
        "ready_again_s_after_resume": round(time.monotonic() - resumed, 1)})


def test_kubernetes_probes_all_ask_the_worker():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "torchserve.yaml").read_text()))
    container = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[1].endswith("healthcheck.py") and command[2] == "torchserve", (probe, command)
