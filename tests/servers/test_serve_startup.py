"""The embedded server that cannot start releases what it had started: ports, servers, the engine."""
from __future__ import annotations

import asyncio
import socket

import pytest

from npas_serve.engine import Engine, EngineConfig
from npas_serve.errors import UserError
from npas_serve.servers.grpc_server import _serve
from tests.support.servers import free_port


def bindable(port: int) -> bool:
    """Nothing holds the port (no SO_REUSEADDR: a listener left open makes this fail)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_taken_rest_port_shuts_metrics_and_the_engine_down(served_checkpoint):
    """Metrics started before the v2 REST port turned out taken: both its server and its port are
    released and the engine is closed, so the UserError leaves nothing running behind it."""
    engine = Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1,)))
    metrics_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            assert engine.ready() and bindable(metrics_port)
            with pytest.raises(UserError, match="--http-port"):
                asyncio.run(_serve(engine, "127.0.0.1", 0, metrics_port, "npas", "1", 1.0,
                                   taken.getsockname()[1]))
            assert bindable(metrics_port), "the metrics server still holds its port"
            assert not engine.ready(), "the engine's scheduler still runs"
        finally:
            engine.close()
