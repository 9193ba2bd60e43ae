"""benchmarks/methods.py --quick: every method trains and is scored, and the outputs are written."""
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


def test_quick_benchmark_runs_every_method_on_both_datasets(bench, tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "methods.json").read_text())
    rows = out["summary"]
    for dataset in bench.DATASETS:
        for m in bench.METHODS:
            budgets = [None] if m.budget_free else [0.25]
            for budget in budgets:
                [row] = [r for r in rows if (r["dataset"], r["method"], r["budget"]) == (dataset, m.name, budget)]
                for metric in bench.METRICS:
                    assert math.isfinite(row[metric])
                assert 0 <= row["ensemble_acc"] <= 1 and row["ensemble_nll"] > 0
    by = {(r["dataset"], r["method"], r["budget"]): r for r in rows}
    for (dataset, method, budget), r in by.items():
        if budget is not None:      # every shared method holds the same bank, within rounding
            ref = by[dataset, "sw-shape", budget]["bank"]
            assert abs(r["bank"] - ref) <= 0.01 * ref
        else:                       # the independent ensemble holds every member whole: more than any budget
            assert 4 * by[dataset, "sw-shape", 0.25]["bank"] < r["bank"] < r["unshared_total"]
    # the hashes' load balance is reported, and orders as designed
    balance = {m: by["mnist1d", m, 0.25]["diagnostics"]["bucket_balance"] for m in ("arbnet-dir-0.1", "arbnet-dir-10")}
    assert balance["arbnet-dir-0.1"] < balance["arbnet-dir-10"]
    table = (tmp_path / "methods.md").read_text()
    assert all(m.name in table for m in bench.METHODS)
    assert (tmp_path / "methods.png").stat().st_size > 10_000
    assert len((tmp_path / "methods.jsonl").read_text().splitlines()) == len(out["runs"])
