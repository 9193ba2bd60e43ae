"""benchmarks/v2.py's comparison against the session's embedded server: both protocols answer every
call, and the ratio is the one their throughputs give."""
import numpy as np

from benchmarks import v2 as bench


def test_compare_drives_both_protocols(embedded):
    x = np.zeros((1, 40), np.float32)
    res = bench.compare(embedded.target, x, {"ensemble_size": embedded.num_members}, clients=2, requests=8,
                        rounds=2)
    for protocol in bench.PROTOCOLS:
        runs = res["runs"][protocol]
        assert [r["round"] for r in runs] == [0, 1]
        assert all(r["requests"] == 8 and r["errors"] == 0 and r["p50_ms"] > 0 for r in runs)
    rps = res["requests_per_s"]
    assert rps["v2"] > 0 and rps["torchserve"] > 0
    assert abs(res["ratio_v2_over_torchserve"] - rps["v2"] / rps["torchserve"]) < 0.01   # both rounded
