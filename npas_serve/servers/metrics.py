"""The project's metrics: one table, two sinks (prometheus-client and TorchServe).

Both servers emit the same names with the same labels. `ModelName` is the
model label because TorchServe adds it (and `Level`, `Hostname`) to every
custom metric by itself; the embedded server uses the same name so one
Grafana dashboard reads both. The TorchServe metrics YAML is generated from
this table (`servers/torchserve/launcher.py`), because TorchServe only exports
metrics declared there.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from npas_serve.engine import Engine, Observation
from npas_serve.errors import UserError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EXAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                   # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]     # besides ModelName
    unit: str = "count"
    buckets: tuple[float, ...] = LATENCY_BUCKETS     # histograms only


METRICS = (
    MetricSpec("npas_requests_total", "counter",
               "Requests ended, by mode and status (ok, invalid, error, deadline, cancelled, overloaded)",
               ("mode", "status")),
    MetricSpec("npas_request_latency_seconds", "histogram", "Engine latency of a request", ("mode",), "s"),
    MetricSpec("npas_members_run_total", "counter", "Members run to their final exit or anytime depth",
               ("member",)),
    MetricSpec("npas_exit_depth_total", "counter", "Anytime answers, by the exit they came from", ("exit",)),
    MetricSpec("npas_budget_misses_total", "counter", "Requests that finished after their latency budget",
               ("mode",)),
    MetricSpec("npas_weight_generation_seconds", "histogram", "Time spent generating weights for a request",
               (), "s"),
    MetricSpec("npas_queue_seconds", "histogram",
               "Time a request waited in the engine's queue before it started running", (), "s"),
    MetricSpec("npas_batch_examples", "histogram",
               "Examples in flight on the device when a request started running (its own included)",
               (), "count", EXAMPLE_BUCKETS),
    MetricSpec("npas_device_busy_seconds_total", "counter",
               "Wall time the device thread spent in rounds of work", (), "s"),
    MetricSpec("npas_device_cpu_seconds_total", "counter",
               "CPU time the device thread had in those rounds; busy minus CPU is time it waited for a core "
               "or for the GIL (or, on CUDA, for the device)", (), "s"),
    MetricSpec("npas_resident_bank_bytes", "gauge",
               "Resident shared state: bank, coefficients, norms and heads", (), "B"),
    MetricSpec("npas_cache_bytes", "gauge", "Generated weights held by the cache", (), "B"),
    MetricSpec("npas_cache_hits_total", "counter", "Stage weights served from the cache", ()),
)
BY_NAME = {m.name: m for m in METRICS}
UPDATES = {"counter": "inc", "gauge": "set", "histogram": "observe"}     # prometheus-client's, by kind
log = logging.getLogger(__name__)


class Sink(Protocol):
    def emit(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None: ...


def record(sink: Sink, engine: Engine, obs: Observation) -> None:
    """Turn one request's observation (and the engine's memory figures) into metric updates."""
    emit = lambda name, value, **labels: sink.emit(BY_NAME[name], value, labels)  # noqa: E731
    emit("npas_requests_total", 1, mode=obs.mode, status=obs.status)
    if obs.status == "invalid":    # refused before any work: nothing else to record
        return
    emit("npas_request_latency_seconds", obs.latency_s, mode=obs.mode)
    for member in obs.members_run:
        emit("npas_members_run_total", 1, member=member)
    if obs.mode == "anytime" and obs.exit_depth is not None:
        emit("npas_exit_depth_total", 1, exit=str(obs.exit_depth))
    if obs.budget_missed:
        emit("npas_budget_misses_total", 1, mode=obs.mode)
    emit("npas_weight_generation_seconds", obs.generation_s)
    if obs.queue_s is not None:            # it reached a batch (not refused while queued)
        emit("npas_queue_seconds", obs.queue_s)
        emit("npas_batch_examples", obs.batch_examples)
    busy_s, cpu_s = engine.take_device_time()
    if busy_s:
        emit("npas_device_busy_seconds_total", busy_s)
        emit("npas_device_cpu_seconds_total", cpu_s)
    resident = engine.resident_bytes()
    emit("npas_resident_bank_bytes", resident.total - resident.cache)
    emit("npas_cache_bytes", resident.cache)
    if obs.cache_hits:
        emit("npas_cache_hits_total", obs.cache_hits)


def serve_metrics(engine: Engine, model_name: str, host: str, port: int):
    """Serve /metrics from prometheus-client, fed every request's observation; the HTTP server
    (its `server_port` is the bound port, `shutdown()` stops it)."""
    import prometheus_client as prom

    sink = PrometheusSink(model_name)
    sink.start_gauges(engine)
    engine.add_observer(lambda obs: record(sink, engine, obs))
    try:
        http_server, _ = prom.start_http_server(port, addr=host, registry=sink.registry)
    except OSError as err:
        raise UserError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}; "
                        f"choose another --metrics-port") from None
    return http_server


class PrometheusSink:
    """prometheus-client metrics on their own registry (served by the embedded server)."""

    def __init__(self, model_name: str, registry=None):
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.model_name = model_name
        self._metrics = {}
        for spec in METRICS:
            labels = ("ModelName", *spec.labels)
            if spec.kind == "counter":
                # prometheus-client appends _total itself
                metric = prom.Counter(spec.name.removesuffix("_total"), spec.help, labels, registry=self.registry)
            elif spec.kind == "gauge":
                metric = prom.Gauge(spec.name, spec.help, labels, registry=self.registry)
            else:
                metric = prom.Histogram(spec.name, spec.help, labels, buckets=spec.buckets,
                                        registry=self.registry)
            self._metrics[spec.name] = metric
        self._updates: dict[tuple, Callable[[float], None]] = {}     # series -> its inc / set / observe

    def emit(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        """About ten a request, on the device thread: each series' update is looked up once, not
        through prometheus-client's `labels()` (validation, a lock, a dict) every time."""
        key = (spec.name, *labels.items())
        update = self._updates.get(key)
        if update is None:
            series = self._metrics[spec.name].labels(ModelName=self.model_name, **labels)
            update = self._updates[key] = getattr(series, UPDATES[spec.kind])
        update(value)

    def start_gauges(self, engine: Engine) -> None:
        """Memory gauges are known before the first request."""
        resident = engine.resident_bytes()
        self.emit(BY_NAME["npas_resident_bank_bytes"], resident.total - resident.cache, {})
        self.emit(BY_NAME["npas_cache_bytes"], resident.cache, {})


class TorchServeSink:
    """TorchServe's `context.metrics`: the frontend exports them on :8082/metrics.

    Each TorchServe metric is a line the worker prints and the frontend parses; at about ten a
    request, printed on the device thread before each answer, they cost a loaded server a fifth
    of its throughput (issue 10). So nothing is printed on a request's way: counters are summed,
    gauges kept at their last value and histogram samples (which cannot be summed) queued, and
    `flush` sends them: a line per counter series that moved, per gauge that changed, per sample.
    The handler asks for it after each TorchServe batch (`flush_soon`), and a thread of the sink's
    own does it beside the next batch.
    """

    def __init__(self, metrics, model_name: str):
        self.metrics = metrics
        self.model_name = model_name
        self._lock = threading.Lock()             # emit runs on the device thread, flush on the sink's
        self._counts: dict[tuple[MetricSpec, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[MetricSpec, tuple[float, float | None]] = {}    # spec -> (value, value last sent)
        self._samples: list[tuple[MetricSpec, float, dict[str, str]]] = []
        self._series: dict[MetricSpec, object] = {}     # spec -> TorchServe's metric object, made once
        self._due = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        with self._lock:
            if spec.kind == "histogram":
                self._samples.append((spec, value, labels))
            elif spec.kind == "counter":
                key = (spec, tuple(sorted(labels.items())))
                self._counts[key] = self._counts.get(key, 0.0) + value
            else:
                self._gauges[spec] = (value, self._gauges.get(spec, (None, None))[1])

    def flush_soon(self) -> None:
        """Have the sink's thread flush, off the caller's way."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_when_due, name="npas-metrics", daemon=True)
            self._flusher.start()
        self._due.set()

    def _flush_when_due(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self.flush()
            except Exception:          # a metric that cannot be sent must not stop the next ones
                log.exception("sending metrics to TorchServe failed")

    def flush(self) -> None:
        """Send what was queued and summed since the last flush, and the gauges that changed."""
        with self._lock:
            counts, self._counts = self._counts, {}
            samples, self._samples = self._samples, []
            gauges = [(spec, value) for spec, (value, sent) in self._gauges.items() if value != sent]
            for spec, value in gauges:
                self._gauges[spec] = (value, value)
        for spec, value, labels in samples:
            self._send(spec, value, labels)
        for (spec, labels), value in counts.items():
            self._send(spec, value, dict(labels))
        for spec, value in gauges:
            self._send(spec, value, {})

    def _declared(self, spec: MetricSpec):
        """TorchServe's metric object of `spec`: the one the metrics YAML declared, or a new one (a
        worker started without that YAML)."""
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError
        from ts.metrics.metric_type_enum import MetricTypes

        try:
            return self.metrics.get_metric(spec.name, MetricTypes(spec.kind))
        except MetricsCacheKeyError:
            return self.metrics.add_metric_to_cache(spec.name, spec.unit, ["ModelName", "Level", *spec.labels],
                                                    MetricTypes(spec.kind))

    def _send(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        """One line through the metric TorchServe declared from the metrics YAML (its dimensions:
        ModelName, Level, then the spec's labels). Not `add_metric`: that builds the series anew for
        every line and stamps it with the ids of every request in the worker's batch, a line of
        several hundred characters that the worker prints and the frontend parses."""
        series = self._series.get(spec)
        if series is None:
            series = self._series[spec] = self._declared(spec)
        series.add_or_update(value, [self.model_name, "Model", *(str(labels[k]) for k in spec.labels)])
