"""TorchServe's sink: nothing printed on a request's way; counters summed, gauges sent on change and
histogram samples one by one when the sink flushes, on a thread of its own after each batch."""
from __future__ import annotations

from npas_serve.servers.metrics import BY_NAME, METRICS, TorchServeSink
from tests.support.wait import wait_until


class Lines:
    """TorchServe's `context.metrics` (its metric cache, as the worker builds it from the metrics YAML),
    keeping what the worker would print: (name, value, labels besides ModelName and Level)."""

    def __init__(self):
        self.sent = []
        self.declared = {spec.name: spec for spec in METRICS}

    def get_metric(self, name, metric_type):
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError

        if name not in self.declared or self.declared[name].kind != metric_type.value:
            raise MetricsCacheKeyError(f"{name} is not declared")
        return Series(self, name, ["ModelName", "Level", *self.declared[name].labels])


class Series:
    def __init__(self, lines: Lines, name: str, dimension_names: list[str]):
        self.lines, self.name, self.dimension_names = lines, name, dimension_names

    def add_or_update(self, value, dimension_values):
        assert len(dimension_values) == len(self.dimension_names)
        dims = dict(zip(self.dimension_names, dimension_values))
        assert dims.pop("ModelName") == "npas" and dims.pop("Level") == "Model"
        self.lines.sent.append((self.name, value, dims))


def emit(sink: TorchServeSink, name: str, value: float, **labels) -> None:
    sink.emit(BY_NAME[name], value, labels)


def test_a_batch_sends_one_line_per_counter_series_and_changed_gauge():
    lines = Lines()
    sink = TorchServeSink(lines, "npas")
    for member in ("wide", "wide", "mid"):
        emit(sink, "npas_members_run_total", 1, member=member)
    for _ in range(3):
        emit(sink, "npas_resident_bank_bytes", 1000)
        emit(sink, "npas_request_latency_seconds", 0.01, mode="ensemble")
    assert lines.sent == []                                  # nothing on the requests' way
    sink.flush()
    assert sorted(lines.sent, key=str) == sorted([("npas_members_run_total", 2.0, {"member": "wide"}),
                                                  ("npas_members_run_total", 1.0, {"member": "mid"}),
                                                  ("npas_resident_bank_bytes", 1000, {})]
                                                 + [("npas_request_latency_seconds", 0.01, {"mode": "ensemble"})] * 3,
                                                 key=str)
    lines.sent.clear()
    emit(sink, "npas_resident_bank_bytes", 1000)       # unchanged: nothing to send
    sink.flush()
    assert lines.sent == []
    emit(sink, "npas_resident_bank_bytes", 2000)
    sink.flush()
    assert lines.sent == [("npas_resident_bank_bytes", 2000, {})]


def test_flush_soon_sends_from_the_sinks_own_thread():
    lines = Lines()
    sink = TorchServeSink(lines, "npas")
    emit(sink, "npas_requests_total", 1, mode="ensemble", status="ok")
    emit(sink, "npas_queue_seconds", 0.002)
    sink.flush_soon()                                        # returns at once; the sink's thread sends
    wait_until(lambda: len(lines.sent) == 2, timeout_s=10, interval_s=0.01)
    assert sorted(lines.sent, key=str) == sorted([("npas_requests_total", 1.0, {"mode": "ensemble", "status": "ok"}),
                                                  ("npas_queue_seconds", 0.002, {})], key=str)
