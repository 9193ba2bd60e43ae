"""benchmarks/methods.py --quick: every method and baseline trains and is scored, the paired comparisons
and the plateau curve are written, and --resume skips what is done."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "methods.json").read_text())


def test_quick_benchmark_runs_every_method_and_baseline(bench, quick):
    out, result = quick
    by = {(r["method"], r["budget"]): r for r in result["summary"]}
    for m in bench.METHODS:
        [row] = [r for (name, _), r in by.items() if name == m.name]
        for metric in ("member_acc", "ensemble_acc", "ensemble_nll", "ensemble_ece", "ensemble_ece_before",
                       "latency_b1_ms", "latency_b32_ms", "final_loss"):
            assert math.isfinite(row[metric]), (m.name, metric)
        assert 0 <= row["ensemble_acc"] <= 1 and row["ensemble_nll"] > 0
    shared = by["sw-gradient", 0.25]
    assert shared["pooled"]                       # 25% is below one template per (group, width): labelled
    assert not by["ssn-shape", 0.25]["pooled"]
    # the baselines hold at most the stored parameters of the shared-bank model they are sized to
    target = bench.reference_params(bench.EQUAL_BUDGET)
    for name in ("deep-ensemble", "packed-ensembles", "batchensemble"):
        assert 0.8 * target <= by[name, None]["stored_params"] <= target
    assert by["unshared", None]["stored_params"] > 4 * target
    # the searches' diagnostics reach the table
    assert {"lead_cos_mean_abs", "merges", "rows_after"} <= set(shared["search"])
    assert "ari" in by["ssn-kmeans", 0.25]["search"]


def test_quick_benchmark_writes_paired_comparisons_curve_and_tables(bench, quick):
    out, result = quick
    questions = {c["question"] for c in result["comparisons"]}
    assert questions == {q for q, _, _ in bench.COMPARISONS}
    for c in result["comparisons"]:     # one seed: an interval cannot exclude 0, so no claim is made
        assert c["seeds"] == 1 and c["verdict"].startswith("no claim")
    assert [p["epoch"] for p in result["curve"]["points"]] == [1]
    assert set(result["curve"]["points"][0]["val_acc"]) == {"wide", "mid", "deep"}
    table = (out / "methods.md").read_text()
    assert all(m.name in table for m in bench.METHODS) and "(pooled)" in table and "95%" in table
    assert (out / "methods.png").stat().st_size > 10_000
    assert len((out / "methods.jsonl").read_text().splitlines()) == len(result["runs"]) == len(bench.METHODS)


def test_paired_intervals_claim_only_when_they_exclude_zero(bench):
    runs = [{"label": a, "budget": 0.25, "seed": s, "ensemble_acc": v}
            for s, (x, y) in enumerate([(0.90, 0.80), (0.91, 0.80), (0.92, 0.81), (0.90, 0.82), (0.93, 0.80)])
            for a, v in (("sw-gradient", x), ("sw-shape", y))]
    clear = bench.paired(runs, "sw-gradient", "sw-shape", 0.25, 0.25, "ensemble_acc")
    assert clear["seeds"] == 5 and clear["ci_low"] > 0 and clear["verdict"] == "sw-gradient better"
    # t(0.975, 4) = 2.776: mean 0.106, sd of the differences 0.018166
    assert clear["mean_diff"] == pytest.approx(0.106)
    assert clear["ci_high"] - clear["mean_diff"] == pytest.approx(2.776 * 0.018166 / math.sqrt(5), rel=1e-3)
    noisy = [dict(r, ensemble_acc=r["ensemble_acc"] + (0.3 if r["seed"] == 0 and r["label"] == "sw-shape"
                                                         else 0)) for r in runs]
    assert bench.paired(noisy, "sw-gradient", "sw-shape", 0.25, 0.25, "ensemble_acc")["verdict"].startswith(
        "no claim")
    nll = [dict(r, ensemble_nll=r["ensemble_acc"]) for r in runs]    # lower is better for NLL
    assert bench.paired(nll, "sw-gradient", "sw-shape", 0.25, 0.25, "ensemble_nll")["verdict"] == "sw-shape better"


def test_resume_skips_finished_runs(bench, quick, tmp_path):
    out, result = quick
    copy = tmp_path / "again"
    copy.mkdir()
    for name in ("methods.jsonl", "methods_curve.json"):
        (copy / name).write_text((out / name).read_text())
    assert bench.main(["--quick", "--out", str(copy), "--resume"]) == 0
    again = json.loads((copy / "methods.json").read_text())
    assert again["runs"] == result["runs"]           # nothing trained twice


def test_report_writes_the_claims_and_equal_parameters_tables_into_the_doc(bench, quick, tmp_path):
    out, result = quick
    doc = tmp_path / "methods.md"
    doc.write_text(f"# before\n\n{bench.DOC_START}\nold figures\n{bench.DOC_END}\n\n# after\n")
    assert bench.main(["--report", "--out", str(out), "--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# before") and text.rstrip().endswith("# after") and "old figures" not in text
    block = text.split(bench.DOC_START)[1].split(bench.DOC_END)[0]
    for question, a, b in bench.COMPARISONS:
        assert f"{question} (`{a}` vs `{b}`)" in block
    assert all(f"| {name} |" in block for name in bench.PLACED)
    assert block.count("no claim") >= len(bench.COMPARISONS)      # one seed: no verdict anywhere
    with pytest.raises(SystemExit, match="markers"):
        bench.main(["--report", "--out", str(out), "--update-doc", str(tmp_path / "none.md")])
