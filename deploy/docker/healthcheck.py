"""Container healthcheck on real readiness; exit status 0 healthy, 1 not.

    python healthcheck.py torchserve [RUN_DIR]   # a worker of model $NPAS_MODEL answers a request
    python healthcheck.py embedded               # gRPC health of the inference service: SERVING

TorchServe's /ping says Healthy while a worker crash-loops, and its worker list can show a
dead process as READY, so readiness is a request the worker itself answers: the management
API's describe with `customized=true` (launcher.worker_answers), sent with the management key
TorchServe wrote into RUN_DIR/key_file.json (token auth stays on), with the ports of
RUN_DIR/config.properties. It also renews the token keys when they are past half their
lifetime (`renewer.renew_due`): in a container nothing else would, and they expire. The embedded server answers the standard gRPC health service,
which turns NOT_SERVING as soon as it starts draining on SIGTERM.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MODEL = os.environ.get("NPAS_MODEL", "npas")


def torchserve_ready(run_dir: Path, timeout_s: float = 8.0) -> bool:
    from npas_serve.servers.torchserve.launcher import Ports, read_config, worker_answers
    from npas_serve.servers.torchserve.renewer import renew_due

    config = read_config(run_dir)
    ports = config.ports if config else Ports()
    host = "127.0.0.1" if config is None or config.host in ("0.0.0.0", "::", "") else config.host
    # a container starts TorchServe itself, without the launcher's renewer: the probe, run every
    # few seconds to minutes, renews the token keys that are past half their lifetime
    renew_due(run_dir, host, ports.management)
    return worker_answers(run_dir, MODEL, ports, host, timeout_s)


def embedded_serving(port: int = 7070) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from npas_serve.servers.grpc_server import SERVICE

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                          timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["torchserve"]:
            ok = torchserve_ready(Path(argv[1] if len(argv) > 1 else "."))
        elif argv[:1] == ["embedded"]:
            ok = embedded_serving(int(os.environ.get("NPAS_GRPC_PORT", "7070")))
        else:
            print("usage: healthcheck.py torchserve [RUN_DIR] | embedded", file=sys.stderr)
            return 2
    except Exception as err:      # not up yet, refused, timed out: unhealthy, say why
        print(f"unhealthy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print("healthy" if ok else "unhealthy: not ready")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
