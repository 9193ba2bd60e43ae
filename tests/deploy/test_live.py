"""deploy/ against running servers: their /metrics passes promtool, a real Prometheus on loopback
scrapes the embedded server and answers every dashboard query, and the container healthcheck
tells a serving server from an absent one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest

from npas_serve.client import Client
from npas_serve.servers.metrics import BY_NAME
from tests.support.deploy import DEPLOY, dashboard_queries, metric_family, prometheus_binary
from tests.support.servers import free_port
from tests.support.wait import wait_until

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def exercise(server) -> str:
    """Requests that touch every metric (ensemble, anytime, a missed budget), then /metrics."""
    x = np.random.default_rng(0).normal(size=(2, 1, 40)).astype(np.float32)
    with Client(server.target, token=server.token, timeout=60) as client:
        client.predict(x, ensemble_size=2)
        client.predict(x, mode="anytime")
        client.predict(x, latency_budget_ms=0.001)
    texts = []

    def scraped() -> bool:                     # TorchServe's frontend publishes metrics asynchronously
        texts.append(urllib.request.urlopen(server.metrics_url, timeout=10).read().decode())
        return set(BY_NAME) - {"npas_cache_hits_total"} <= exported(texts[-1])

    wait_until(scraped, timeout_s=30, interval_s=0.5)
    return texts[-1]


def exported(text: str) -> set[str]:
    """Metric families with samples; prometheus-client's `_created` timestamps are not metrics of ours."""
    return {metric_family(m) for m in re.findall(r"^(npas_\w+)[{ ]", text, re.M) if not m.endswith("_created")}


@pytest.mark.parametrize("kind", ["embedded", "torchserve"])
def test_live_metrics_pass_promtool_and_cover_the_dashboard(kind, request):
    promtool = prometheus_binary("promtool")
    server = request.getfixturevalue(kind)
    text = exercise(server)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # The one lint promtool raises is by design: TorchServe names its model label `ModelName`
    # (and adds `Level`, `Hostname`) on every custom metric, and the embedded server uses the
    # same label so one dashboard reads both. Anything else (a parse error, a counter without
    # _total, a bad unit suffix) fails.
    # TorchServe's own frontend metrics (Requests2XX, ...) have lints of their own: not ours to fix.
    output = done.stdout + done.stderr
    assert "error while linting" not in output and done.returncode in (0, 3), output
    ours = [line for line in output.splitlines() if line.startswith("npas_")]
    camel = "label names should be written in 'snake_case' not 'camelCase'"
    assert all(line.endswith(camel) for line in ours), "\n".join(ours)
    labels = {name for block in re.findall(r"^npas_\w+\{([^}]*)\}", text, re.M)
              for name in re.findall(r'(\w+)="', block)}
    assert labels <= {"ModelName", "Level", "Hostname", "le", *(l for m in BY_NAME.values() for l in m.labels)}
    names = exported(text)
    # every metric of the table, but cache hits: the served engine runs without a cache
    assert set(BY_NAME) - {"npas_cache_hits_total"} <= names <= set(BY_NAME), set(BY_NAME) ^ names
    wanted = {metric_family(n) for q in dashboard_queries() for n in re.findall(r"\bnpas_\w+", q)}
    assert wanted - {"npas_cache_hits_total"} <= names
    assert re.search(r'npas_requests_total\{[^}]*ModelName="npas"', text)


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_prometheus_scrapes_the_embedded_server_and_answers_the_dashboard(embedded, tmp_path):
    prometheus = prometheus_binary("prometheus")
    exercise(embedded)
    port = free_port()
    target = embedded.metrics_url.split("/")[2]
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: embedded\n"
                      f"    static_configs:\n      - targets: ['{target}']\n        labels: {{server: embedded}}\n")
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    def results(expr: str) -> list:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        try:
            return _query(port, expr)["data"]["result"]
        except OSError:                                  # not listening yet
            return []

    try:
        result = wait_until(lambda: results('npas_requests_total{ModelName="npas"}'), timeout_s=60, interval_s=0.5)
        assert result, "Prometheus returned no npas_requests_total within 60 s"
        assert {r["metric"]["mode"] for r in result} >= {"ensemble", "anytime"}
        before = sum(float(r["value"][1]) for r in result)
        assert before >= 3
        exercise(embedded)
        # rate() needs two samples in its window: wait until a scrape after the second round is in
        total = 'sum(npas_requests_total{ModelName="npas"})'
        assert wait_until(lambda: [r for r in results(total) if float(r["value"][1]) >= before + 3],
                          timeout_s=60, interval_s=0.5), "Prometheus did not scrape the second round within 60 s"
        exprs = [e.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$server", ".*")
                 for e in dashboard_queries() if not e.startswith("label_values")]
        # the served engine has no cache (--cache-bytes 0): its hit counter may stay without data
        wanted = [e for e in exprs if "npas_cache_hits_total" not in e]
        wait_until(lambda: all(results(e) for e in wanted), timeout_s=30, interval_s=0.5)
        without_data = [e for e in wanted if not results(e)]
        assert not without_data, f"no data for {without_data}"
        for expr in exprs:
            answer = _query(port, expr)
            assert answer["status"] == "success", (expr, answer)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_healthcheck_tells_serving_from_absent(embedded):
    def check(*args, port):
        env = dict(os.environ, NPAS_GRPC_PORT=str(port))
        return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True,
                              text=True, timeout=60)

    good = check("embedded", port=int(embedded.target.rsplit(":", 1)[1]))
    assert good.returncode == 0, good.stdout + good.stderr
    assert check("embedded", port=free_port()).returncode == 1
    assert check("bogus", port=free_port()).returncode == 2
