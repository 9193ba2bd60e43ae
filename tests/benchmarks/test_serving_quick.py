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
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npas_serve.engine import Engine, EngineConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = "# figures\n\n<!-- figures:start (benchmarks/serving.py --update-doc) -->\nold\n<!-- figures:end -->\n\nkept\n"
QUICK_REPS, QUICK_SECONDS, QUICK_ROUNDS, BUDGET_FACTOR = 6, 0.5, 2, 3.0   # --quick counts, the default factor
ARMS = ("on_the_fly", "prebuilt", "engine_frozen")


def positive_summary(s: dict, n: int | None = None) -> None:
    assert (n is None or s["n"] == n) and 0 < s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] and s["mean_ms"] > 0, s


@pytest.fixture(scope="module")
def quick(served_checkpoint, tmp_path_factory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("serving-quick")
    out, doc = tmp / "serving.json", tmp / "serving.md"
    doc.write_text(DOC)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), str(served_checkpoint),
                           "--quick", "--out", str(out), "--update-doc", str(doc)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), doc.read_text(), out


def test_machine_and_config_describe_this_run(quick, served_checkpoint):
    res, _, _ = quick
    assert res["quick"] is True and res["checkpoint"] == str(served_checkpoint.resolve())
    m = res["machine"]
    assert m["nproc"] == os.cpu_count() and m["torch"] == torch.__version__ and m["device"] == "cpu"
    assert m["torch_threads"] == EngineConfig().threads      # the engine's default, not a benchmark flag
    assert all(len(m[k]) == 3 and min(m[k]) >= 0 for k in ("loadavg_start", "loadavg_end"))
    assert (res["config"]["reps"], res["config"]["seconds"], res["config"]["rounds"]) == \
           (QUICK_REPS, QUICK_SECONDS, QUICK_ROUNDS)
    assert res["elapsed_s"] > res["engine_load_s"] > 0


def test_latency_cells_are_measured_and_consistent(quick):
    res, _, _ = quick
    lat, names = res["latency"], list(res["resident"]["member_unshared_weight_bytes"])
    assert {(c["batch"], c["target"]) for c in lat["cells"]} == {(b, t) for b in (1, 32) for t in ["ensemble", *names]}
    for c in lat["cells"]:
        assert c["members"] == (names if c["target"] == "ensemble" else [c["target"]])
        for arm in ARMS:
            positive_summary(c[arm], QUICK_REPS)
            positive_summary(c["cpu"][arm], QUICK_REPS)
            assert c["page_faults_per_request"][arm] >= 0
        assert math.isclose(c["ratio"], c["on_the_fly"]["median_ms"] / c["prebuilt"]["median_ms"])
        assert math.isclose(c["ratio_engine_frozen"], c["on_the_fly"]["median_ms"] / c["engine_frozen"]["median_ms"])
        assert math.isclose(c["cpu_ratio"], c["cpu"]["on_the_fly"]["median_ms"] / c["cpu"]["prebuilt"]["median_ms"])
        assert c["generation_ms_median"] > 0       # cache off: every on-the-fly answer generates weights
    full32 = next(c for c in lat["cells"] if (c["batch"], c["target"]) == (32, "ensemble"))
    assert math.isclose(lat["ceiling"]["examples_per_s"], 32_000 / full32["prebuilt"]["median_ms"])


def test_resident_bytes_are_the_engines_and_nothing_outlives_a_batch(quick, served_checkpoint):
    res, _, _ = quick
    engine = Engine.load(served_checkpoint, EngineConfig(cache_bytes=0))
    try:
        rb, ours = res["resident"], engine.resident_bytes()
    finally:
        engine.close()
    assert (rb["bank"], rb["coefficients"], rb["norms_heads"], rb["cache"], rb["resident_total"]) == \
           (ours.bank, ours.coefficients, ours.norms_heads, 0, ours.total)
    assert rb["bank"] > 0 and rb["members"] == len(engine.names)
    shared = [4 * n for n in engine.family.member_shared_numel()]        # float32 weights
    assert rb["member_unshared_weight_bytes"] == dict(zip(engine.names, shared))
    assert rb["unshared_total"] == sum(shared) and rb["transient_weights_left_after_batch"] == 0
    assert rb["met"] == (rb["resident_total"] <= rb["target"])
    gen = res["generation"]
    assert set(gen) == {*engine.names, "every member at once"}
    for g in gen.values():
        assert g["weights"] > 0 and g["cpu_ms_median"] > 0
        assert g["ops"] == sum(g["ops_by_name"].values()) > 0 and g["prebuilt_forward_ops_batch1"] > 0
    assert gen["every member at once"]["weights"] == sum(gen[n]["weights"] for n in engine.names)
    # one call for every member reads each bank once: fewer operations than a call per stage
    assert gen["every member at once"]["ops"] < sum(gen[n]["ops"] for n in engine.names)


def test_servers_answered_and_figures_add_up(quick):
    res, _, _ = quick
    kinds = ["embedded"] + (["torchserve"] if shutil.which("java") else [])
    if not shutil.which("java"):
        assert "skipped" in res["servers"]["torchserve"]
    # one budget for every server: the user's, from the slowest server's 1-client p50
    user_ms = BUDGET_FACTOR * max(res["servers"][k]["p50_1_client_ms"] for k in kinds)
    assert all(math.isclose(res["servers"][k]["budget_ms"], user_ms) for k in kinds)
    for kind in kinds:
        sec = res["servers"][kind]
        assert "skipped" not in sec, sec
        assert sec["start_s"] > 0
        for warm_up in (sec["warm_up"], sec["paced_warm_up"]):    # each server run warmed before it is measured
            assert warm_up["windows_req_s"] and min(warm_up["windows_req_s"]) > 0 and warm_up["calls"] > 0
        assert [r["clients"] for r in sec["batch1"]] == res["config"]["clients_batch1"] == [1, 4, 16, 64]
        assert [r["clients"] for r in sec["batch32"]] == res["config"]["clients_batch32"] == [1, 4]
        for r in sec["batch1"] + sec["batch32"] + sec["paced"]:    # the machine's CPU lent to others, per load
            assert r["cpu_stolen"] is None or 0 <= r["cpu_stolen"] <= 1
        for r in sec["batch1"] + sec["batch32"]:
            # each row is its median round (the lower of two), every round's figures beside it
            assert len(r["rounds_req_s"]) == len(r["rounds_cpu_stolen"]) == QUICK_ROUNDS
            assert r["requests_per_s"] == min(r["rounds_req_s"]) and r["cpu_stolen"] in r["rounds_cpu_stolen"]
            assert r["requests"] > 0 and r["errors"] == sum(r["error_codes"].values())
            assert math.isclose(r["examples_per_s"], r["requests_per_s"] * r["batch"])
            positive_summary(r["client_latency"], r["requests"])
            assert math.isclose(r["little_mean_ms"], r["clients"] / r["requests_per_s"] * 1000)
        # the capacity: the best batch-1 round of any client count, with that round's CPU stolen
        rounds = {(v, s) for r in sec["batch1"] if r["clients"] == sec["capacity_clients"]
                  for v, s in zip(r["rounds_req_s"], r["rounds_cpu_stolen"])}
        assert sec["capacity_req_s"] == max(v for r in sec["batch1"] for v in r["rounds_req_s"])
        assert (sec["capacity_req_s"], sec["capacity_cpu_stolen"]) in rounds
        assert sec["p50_1_client_ms"] == sec["batch1"][0]["client_latency"]["median_ms"]
        expired = sec["expired"]       # calls past their deadline: every one refused as such, none run
        assert expired["calls"] > 0 and expired["answered"] == 0
        assert expired["error_codes"] == {"DEADLINE_EXCEEDED": expired["calls"]}
        assert expired["server_cpu_ms_per_call"] is None or expired["server_cpu_ms_per_call"] > 0
        assert math.isclose(sec["own_budget_ms"], BUDGET_FACTOR * sec["p50_1_client_ms"])
        # the shares below capacity in every round, the overload once
        user = [(p["round"], p["share_of_capacity"]) for p in sec["paced"] if p["budget"] == "user"]
        assert res["config"]["paced_shares"] == [0.5, 0.9, 1.5]
        assert user == [(i, s) for i in range(QUICK_ROUNDS) for s in (0.5, 0.9)] + [(0, 1.5)]
        own = [(p["round"], p["share_of_capacity"]) for p in sec["paced"] if p["budget"] == "own"]
        tighter = sec["own_budget_ms"] < 0.9 * sec["budget_ms"]       # a faster server's own budget
        assert own == ([(i, s) for i in range(QUICK_ROUNDS) for s in (0.5, 0.9)] if tighter else [])
        for p in sec["paced"]:
            assert p["budget_ms"] == (sec["budget_ms"] if p["budget"] == "user" else sec["own_budget_ms"])
            assert math.isclose(p["rate_per_s"], p["share_of_capacity"] * sec["capacity_req_s"])
            assert p["offered_per_s"] > 0
            assert p["sent"] == p["answered"] + p["refused"] + p["other_errors"] + p["lost"]
            assert p["client_hit_rate"] == p["client_within_budget"] / p["sent"] and p["lost"] == 0


def test_must_show_flags_follow_their_own_figures(quick):
    res, _, out = quick
    names = [row["name"] for row in res["must_show"]]
    assert "in-process ensemble b1: on the fly / pre-built" in names
    assert "in-process ensemble b32: on the fly / pre-built" in names
    assert any(n.startswith("embedded b1 16 clients") for n in names)
    for kind, sec in res["servers"].items():       # a paced share's row: the median of its rounds
        for pct in (50, 90):
            row = next((r for r in res["must_show"] if r["name"] == f"{kind} within budget at the client, "
                                                                   f"{pct}% of capacity"), None)
            rates = [p["client_hit_rate"] for p in sec.get("paced", [])
                     if p["budget"] == "user" and round(p["share_of_capacity"] * 100) == pct]
            assert (row is None) == ("skipped" in sec)
            assert row is None or (len(rates) == QUICK_ROUNDS and math.isclose(row["value"], statistics.median(rates)))
    for row in res["must_show"]:
        if row["value"] is not None:
            assert row["met"] == (row["value"] >= row["limit"] if row["at_least"] else row["value"] <= row["limit"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_update_doc_rewrites_only_the_figures_block(quick):
    res, text, _ = quick
    assert "old" not in text and text.startswith("# figures\n") and text.endswith("kept\n")
    assert res["command"] in text and f"| {res['resident']['bank']:,} |" in text
