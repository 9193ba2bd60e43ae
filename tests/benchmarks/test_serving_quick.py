"""`benchmarks/serving.py --quick` on the tiny trained checkpoint: it runs and writes every section.

Only the shape of the report is checked. The timing targets are the benchmark's
business (docs/serving.md): on a shared machine a test of them would only be flaky.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = "# figures\n\n<!-- figures:start (benchmarks/serving.py --update-doc) -->\nold\n<!-- figures:end -->\n\nkept\n"


def test_serving_quick_writes_every_section(served_checkpoint, tmp_path):
    out, doc = tmp_path / "serving.json", tmp_path / "serving.md"
    doc.write_text(DOC)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), str(served_checkpoint),
                           "--quick", "--out", str(out), "--update-doc", str(doc)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = json.loads(out.read_text())

    assert res["quick"] is True and res["command"].startswith(".venv/bin/python benchmarks/serving.py")
    assert {"nproc", "cpu_model", "torch", "loadavg_start", "loadavg_end"} <= set(res["machine"])

    names = list(res["resident"]["member_unshared_weight_bytes"])
    cells = {(c["batch"], c["target"]) for c in res["latency"]["cells"]}
    assert cells == {(b, t) for b in (1, 32) for t in ["ensemble", *names]}
    for c in res["latency"]["cells"]:
        assert c["on_the_fly"]["median_ms"] > 0 and c["prebuilt"]["median_ms"] > 0 and c["ratio"] > 0
    assert set(res["latency"]["targets"]) == {"batch1", "batch32"}
    assert all(isinstance(t["met"], bool) for t in res["latency"]["targets"].values())

    rb = res["resident"]
    assert rb["resident_total"] == rb["bank"] + rb["coefficients"] + rb["norms_heads"] + rb["cache"]
    assert rb["cache"] == 0 and isinstance(rb["met"], bool)

    java = shutil.which("java") is not None
    for kind in ("embedded", "torchserve"):
        tp, bud = res["throughput"][kind], res["budget"][kind]
        if kind == "torchserve" and not java:
            assert "skipped" in tp and "skipped" in bud
            continue
        assert [r["batch"] for r in tp["runs"]] == [1, 32]
        assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in tp["runs"])
        assert bud["requests"] > 0 and bud["errors"] == 0 and 0.0 <= bud["hit_rate"] <= 1.0

    text = doc.read_text()
    assert "old" not in text and text.endswith("kept\n") and res["command"] in text
