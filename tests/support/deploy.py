"""What the deploy/ tests share: the deploy tree, the dashboard's queries, metric families, Prometheus tools."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from npas_serve.servers.metrics import BY_NAME

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def dashboard() -> dict:
    return json.loads((DEPLOY / "compose" / "grafana" / "dashboards" / "npas-serve.json").read_text())


def dashboard_queries() -> list[str]:
    d = dashboard()
    return ([t["expr"] for p in d["panels"] for t in p["targets"]]
            + [v["definition"] for v in d["templating"]["list"]])


def metric_family(name: str) -> str:
    """npas_x_bucket -> npas_x for histograms; counters and gauges are their own family."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and BY_NAME[base].kind == "histogram":
            return base
    return name


def prometheus_binary(name: str) -> str:
    """The path of `promtool` / `prometheus`; the calling test skips, saying why, where it is missing.

    Tests install nothing: scripts/setup.sh installs the Debian package `prometheus` where missing.
    """
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not on PATH; scripts/setup.sh installs it (Debian package `prometheus`)")
    return found
