"""Write TorchServe's config.properties, metrics YAML and log configuration for a container, from the
project's own code.

The same functions that `npas-serve torchserve start` uses, so ports, token auth and the
declared `model_metrics:` (without which TorchServe exports none of ours) never drift
from the code. The addresses are 0.0.0.0: in a container, loopback is unreachable from
outside, and the network boundary is the container's or the pod's.

    python torchserve_config.py RUN_DIR MODEL_STORE [--no-token-auth]

Token auth stays on by default. TorchServe 0.12 draws fresh keys per instance, so several
replicas behind one Service cannot share a key: Kubernetes passes --no-token-auth and
keeps callers out with a NetworkPolicy and its gateway instead (see docs/deployment.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

from npas_serve.servers.torchserve.launcher import Ports, write_config


def write(run_dir: Path, model_store: Path, host: str = "0.0.0.0", token_auth: bool = True) -> Path:
    return write_config(run_dir, model_store, host, Ports(), dev=not token_auth)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-token-auth"]
    if len(args) != 2:
        sys.exit("usage: torchserve_config.py RUN_DIR MODEL_STORE [--no-token-auth]")
    print(write(Path(args[0]), Path(args[1]), token_auth="--no-token-auth" not in sys.argv))
