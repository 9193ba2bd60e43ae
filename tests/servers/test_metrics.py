"""TorchServe's sink: nothing printed on a request's way; counters summed, gauges sent on change and
histogram samples one by one when the sink flushes, on a thread of its own after each batch."""
from __future__ import annotations

from npas_serve.servers.metrics import BY_NAME, TorchServeSink
from tests.support.wait import wait_until


class Lines:
    """TorchServe's `context.metrics`, keeping what the worker would print (name, value, labels)."""

    def __init__(self):
        self.sent = []

    def add_metric(self, name, value, unit, idx, dimensions, metric_type):
        labels = {d.name: d.value for d in dimensions if d.name not in ("ModelName", "Level")}
        self.sent.append((name, value, labels))


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
