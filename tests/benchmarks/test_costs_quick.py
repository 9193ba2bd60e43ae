"""benchmarks/costs.py in quick mode on the tiny families: figures that are positive and agree with each other."""
import json

from benchmarks import costs
from npas_serve.evaluate import count_flops
from npas_serve.family import FamilySpec, build_family


def test_costs_quick(tmp_path):
    doc = tmp_path / "serving.md"
    doc.write_text(f"before\n{costs.DOC_START}\nold\n{costs.DOC_END}\nafter\n")
    res = costs.main(["--families", "mnist1d-resnet-tiny", "cifar-wrn-tiny", "--quick", "--seconds", "0.2",
                      "--out", str(tmp_path / "costs.json"), "--update-doc", str(doc)])
    assert json.loads((tmp_path / "costs.json").read_text()) == json.loads(json.dumps(res))
    small, large = res["families"]
    for row in (small, large):
        params, resident = row["parameters"], row["resident_bytes"]
        assert resident["within_limit"] and resident["on_the_fly"] <= resident["limit"]
        assert resident["bank"] == 4 * params["bank"] and resident["on_the_fly"] < resident["pre_built"]
        assert params["unshared_total"] == sum(params["members_unshared"])
        assert all(ms > 0 for ms in row["generation_ms_per_member"].values())
        for cell in row["latency"].values():
            assert cell["pairs"] >= 3 and cell["on_the_fly_ms"] > 0 and cell["pre_built_ms"] > 0
        flops = count_flops(build_family(FamilySpec(family=row["family"])), tuple(row["input_shape"]))
        assert row["flops_per_example"]["ensemble"] == sum(f[-1] for f in flops)
    assert large["flops_per_example"]["ensemble"] > 10 * small["flops_per_example"]["ensemble"]
    text = doc.read_text()
    assert "old" not in text and "cifar-wrn-tiny" in text and text.startswith("before") and text.endswith("after\n")
