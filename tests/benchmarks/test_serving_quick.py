"""`benchmarks/serving.py --quick` on the tiny trained checkpoint: every section is written, and its
figures are measurements of this checkpoint (positive, self-consistent, and what the engine reports).

The timing targets themselves are the benchmark's business (docs/serving.md): on a shared machine a
test of them would only be flaky, so only whether each was met is checked against its own figures.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npas_serve.engine import Engine, EngineConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = "# figures\n\n<!-- figures:start (benchmarks/serving.py --update-doc) -->\nold\n<!-- figures:end -->\n\nkept\n"
QUICK_REPS, QUICK_REQUESTS, BUDGET_FACTOR = 10, 24, 2.0      # the benchmark's --quick counts and default factor


def positive_summary(s: dict, n: int) -> None:
    assert s["n"] == n and 0 < s["median_ms"] <= s["p90_ms"] and s["mean_ms"] > 0, s


@pytest.fixture(scope="module")
def quick(served_checkpoint, tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("serving-quick")
    out, doc = tmp / "serving.json", tmp / "serving.md"
    doc.write_text(DOC)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), str(served_checkpoint),
                           "--quick", "--out", str(out), "--update-doc", str(doc)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), doc.read_text()


def test_machine_and_config_describe_this_run(quick, served_checkpoint):
    res, _ = quick
    assert res["quick"] is True and res["checkpoint"] == str(served_checkpoint.resolve())
    m = res["machine"]
    assert m["nproc"] == os.cpu_count() and m["torch"] == torch.__version__ and m["torch_threads"] == 1
    assert all(len(m[k]) == 3 and min(m[k]) >= 0 for k in ("loadavg_start", "loadavg_end"))
    assert (res["config"]["reps"], res["config"]["requests"]) == (QUICK_REPS, QUICK_REQUESTS)
    assert res["elapsed_s"] > res["engine_load_s"] > 0


def test_latency_cells_are_measured_and_consistent(quick):
    res, _ = quick
    lat, names = res["latency"], list(res["resident"]["member_unshared_weight_bytes"])
    assert {(c["batch"], c["target"]) for c in lat["cells"]} == {(b, t) for b in (1, 32) for t in ["ensemble", *names]}
    for c in lat["cells"]:
        assert c["members"] == (names if c["target"] == "ensemble" else [c["target"]])
        for key in ("on_the_fly", "prebuilt", "cpu_on_the_fly", "cpu_prebuilt"):
            positive_summary(c[key], QUICK_REPS)
        assert math.isclose(c["ratio"], c["on_the_fly"]["median_ms"] / c["prebuilt"]["median_ms"])
        assert math.isclose(c["cpu_ratio"], c["cpu_on_the_fly"]["median_ms"] / c["cpu_prebuilt"]["median_ms"])
        # cache off: every on-the-fly answer generates weights, and that takes time
        assert c["generation_ms_median"] > 0
        assert min(c["page_faults_per_request"].values()) >= 0
    for batch in (1, 32):
        t, rows = lat["targets"][f"batch{batch}"], [c for c in lat["cells"] if c["batch"] == batch]
        full = next(c for c in rows if c["target"] == "ensemble")
        assert t["ensemble_ratio"] == full["ratio"] and t["worst_ratio"] == max(c["ratio"] for c in rows)
        assert t["met"] == (t["worst_ratio"] <= t["target"]) and t["target"] == res["targets"][f"ratio_batch{batch}"]


def test_resident_bytes_are_the_engines(quick, served_checkpoint):
    res, _ = quick
    engine = Engine.load(served_checkpoint, EngineConfig(cache_bytes=0))
    rb, ours = res["resident"], engine.resident_bytes()
    assert (rb["bank"], rb["coefficients"], rb["norms_heads"], rb["cache"], rb["resident_total"]) == \
           (ours.bank, ours.coefficients, ours.norms_heads, 0, ours.total)
    assert rb["bank"] > 0 and rb["members"] == len(engine.names)
    shared = [4 * n for n in engine.family.member_shared_numel()]        # float32 weights
    assert rb["member_unshared_weight_bytes"] == dict(zip(engine.names, shared))
    assert rb["unshared_total"] == sum(shared)
    assert rb["met"] == (rb["resident_total"] <= rb["target"])
    for name, g in res["generation"].items():
        assert name in engine.names and g["weights"] > 0 and g["cpu_ms_median"] > 0
        assert g["ops"] == sum(g["ops_by_name"].values()) > 0 and g["prebuilt_forward_ops_batch1"] > 0


def test_servers_answered_every_request(quick):
    res, _ = quick
    ensemble_b1 = next(c for c in res["latency"]["cells"] if c["batch"] == 1 and c["target"] == "ensemble")
    budget_ms = res["config"]["budget_ms"]
    assert math.isclose(budget_ms, BUDGET_FACTOR * ensemble_b1["on_the_fly"]["median_ms"])
    members = len(res["resident"]["member_unshared_weight_bytes"])
    kinds = ["embedded"] + (["torchserve"] if shutil.which("java") else [])
    if not shutil.which("java"):
        assert "skipped" in res["throughput"]["torchserve"] and "skipped" in res["budget"]["torchserve"]
    for kind in kinds:
        tp, bud = res["throughput"][kind], res["budget"][kind]
        assert "skipped" not in tp, tp
        assert [r["batch"] for r in tp["runs"]] == [1, 32] and tp["start_s"] > 0
        for r in tp["runs"]:
            assert (r["requests"], r["errors"]) == (QUICK_REQUESTS, 0)
            assert r["requests_per_s"] > 0 and math.isclose(r["examples_per_s"], r["requests_per_s"] * r["batch"])
            positive_summary(r["client_latency"], QUICK_REQUESTS)
        assert (bud["requests"], bud["errors"], bud["budget_ms"]) == (QUICK_REQUESTS, 0, budget_ms)
        assert math.isclose(bud["rate_per_s"], res["config"]["load_factor"] * tp["runs"][0]["requests_per_s"])
        assert bud["hit_rate"] == bud["budget_met"] / bud["requests"]
        assert sum(bud["members_used_histogram"].values()) == bud["requests"]
        assert {int(k) for k in bud["members_used_histogram"]} <= set(range(1, members + 1))
        positive_summary(bud["engine_latency"], QUICK_REQUESTS)


def test_update_doc_rewrites_only_the_figures_block(quick):
    res, text = quick
    assert "old" not in text and text.startswith("# figures\n") and text.endswith("kept\n")
    assert res["command"] in text and f"| {res['resident']['bank']:,} |" in text
