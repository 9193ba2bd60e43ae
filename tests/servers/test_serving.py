"""The client suite, run unchanged against the embedded server and real TorchServe."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from npas_serve.client import Client, ClientError
from npas_serve.data import load_dataset
from tests.support.wait import wait_until



@pytest.fixture(scope="module")
def examples():
    data = load_dataset("mnist1d")
    return data.x_test[:8, None].astype(np.float32), data.y_test[:8]


def client(server) -> Client:
    return Client(server.target, "npas", token=server.token, timeout=60)


def test_ping(server):
    with client(server) as c:
        assert "Healthy" in c.ping()


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_every_ensemble_size(server, examples, fmt):
    x, y = examples
    with client(server) as c:
        for k in range(1, server.num_members + 1):
            answer = c.predict(x, fmt=fmt, ensemble_size=k)
            assert len(answer.members_used) == k and answer.final
            assert answer.probabilities.shape == (len(x), 10)
            np.testing.assert_allclose(answer.probabilities.sum(axis=1), 1.0, atol=1e-4)
            assert len(answer.entropy) == len(answer.disagreement) == len(x)
            assert answer.predictions == answer.probabilities.argmax(axis=1).tolist()
        # the trained tiny family is far above chance on these examples
        assert np.mean(np.array(answer.predictions) == y) >= 0.5


def test_stream_anytime_one_message_per_exit(server, examples):
    """The embedded server streams every exit; TorchServe 0.12 sends the final one alone (its worker
    cannot tell StreamPredictions from a unary call, where a second message would cost the worker)."""
    x, _ = examples
    with client(server) as c:
        answers = list(c.stream(x, mode="anytime"))
    exits = list(range(server.num_exits)) if server.kind == "embedded" else [server.num_exits - 1]
    assert [a.exit_reached for a in answers] == exits
    assert [a.final for a in answers] == [False] * (len(exits) - 1) + [True]
    assert len({a.members_used[0] for a in answers}) == 1


def test_plan_shrinks_with_the_budget(server, examples):
    x, _ = examples
    with client(server) as c:
        sizes = [len(c.predict(x, latency_budget_ms=b).plan) for b in (50_000, 0.001)]
        answer = c.predict(x, latency_budget_ms=50_000)
    assert sizes[0] == server.num_members and sizes[-1] == 1
    assert answer.budget_met is True and answer.budget_ms == 50_000


def test_bad_request_is_invalid_argument_and_serving_goes_on(server, examples):
    x, _ = examples
    with client(server) as c:
        with pytest.raises(ClientError) as err:
            c.predict(x, ensemble_size=server.num_members + 1)
        assert err.value.code == "INVALID_ARGUMENT" and "ensemble_size" in err.value.details
        assert c.predict(x, ensemble_size=1).final


def test_project_metrics_are_exported(server, examples):
    x, _ = examples
    with client(server) as c:
        c.predict(x, ensemble_size=2)
        c.predict(x, mode="anytime")

    def scrape() -> str:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
            return resp.read().decode()

    def answered(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("npas_requests_total{") and 'status="ok"' in line)

    # values, not names alone; TorchServe's worker sends its lines after the batch, the frontend reads them after
    assert wait_until(lambda: answered(scrape()) >= 2, timeout_s=30, interval_s=0.2), \
        f"{server.kind} /metrics counts {answered(scrape())} answered requests, after 2"
    text = scrape()
    for name in ("npas_requests_total", "npas_request_latency_seconds", "npas_members_run_total",
                 "npas_exit_depth_total", "npas_resident_bank_bytes", "npas_weight_generation_seconds",
                 "npas_queue_seconds", "npas_batch_examples", "npas_device_busy_seconds_total",
                 "npas_device_cpu_seconds_total"):
        assert name in text, f"{name} missing from {server.kind} /metrics"
