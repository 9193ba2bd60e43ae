"""How serving costs grow with the model: the MNIST-1D default family beside the CIFAR-scale wide ResNets.

    .venv/bin/python benchmarks/costs.py [--families mnist1d-resnet cifar-wrn] [--out benchmarks/results/costs.json]
                                         [--update-doc docs/serving.md] [--quick]

Per family, in one process: parameters (the bank, coefficients, norms and heads, and what the
members hold unshared), the bytes the engine keeps resident (and the bound they must meet: the
members' unshared total / number of members, plus norms and heads), the time to generate each
member's weights, the latency of the full ensemble with weights generated on the fly against the
same members pre-built (`freeze`), at batch 1 and 32, and FLOPs per example. Costs do not depend
on training, so each family is built with its registered budget and random weights (a trained
checkpoint has the same shapes, so the same costs). The on-the-fly and pre-built runs alternate
(AB, BA, ...) so drift from other work on the machine hits both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from npas_serve.checkpoint import Manifest  # noqa: E402
from npas_serve.data import Normalisation  # noqa: E402
from npas_serve.engine import Engine, EngineConfig  # noqa: E402
from npas_serve.engine.memory import target_bytes  # noqa: E402
from npas_serve.engine.planner import Step  # noqa: E402
from npas_serve.engine.traces import Traces  # noqa: E402
from npas_serve.evaluate import count_flops, param_count  # noqa: E402
from npas_serve.family import Family, FamilySpec, build_family  # noqa: E402
from npas_serve.protocol.request import InferenceRequest  # noqa: E402

FAMILIES = {"mnist1d-resnet": (1, 40), "cifar-wrn": (3, 32, 32),          # the family -> its input shape
            "mnist1d-resnet-tiny": (1, 40), "cifar-wrn-tiny": (3, 32, 32)}
DOC_START, DOC_END = "<!-- costs:start (benchmarks/costs.py --update-doc) -->", "<!-- costs:end -->"


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["mnist1d-resnet", "cifar-wrn"], choices=sorted(FAMILIES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/costs.json"))
    p.add_argument("--update-doc", type=Path, default=None, help="rewrite the costs block of this page")
    p.add_argument("--quick", action="store_true", help="a few repetitions: a smoke test, not figures")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time per latency cell, in AB pairs of at least 3 (default 20; quick 0.5)")
    return p.parse_args(argv)


def engine_for(family: Family, name: str, input_shape: tuple[int, ...], freeze: bool) -> Engine:
    manifest = Manifest(spec=family.spec, member_names=family.names, num_exits=family.num_exits,
                        input_shape=list(input_shape), num_classes=10, normalisation=Normalisation(0.0, 1.0),
                        budget_params=family.budget_params, data=f"costs of {name}")
    return Engine(family, manifest, EngineConfig(freeze=freeze, warmup_batch_sizes=(1,)))


def parameters(family: Family) -> dict:
    p = param_count(family)
    unshared = list(p.unshared.values())
    return {"bank": p.bank, "coefficients": p.coefficients, "norms_heads": sum(p.private.values()),
            "members_unshared": unshared, "unshared_total": p.unshared_total, "members": len(unshared),
            "unshared_total_per_member": p.unshared_total / len(unshared)}


@torch.inference_mode()
def generation_ms(family: Family, input_shape: tuple[int, ...], reps: int) -> list[float]:
    """Median milliseconds to generate every stage's weights of each member in one call, through the
    engine's generation traces (`Traces.weights`, the path an on-the-fly engine takes)."""
    traces = Traces(family.requires_grad_(False), torch.device("cpu"), None, input_shape)
    result = []
    for m in range(len(family.members)):
        steps = [Step(m, s) for s in range(family.num_exits)]
        traces.weights(steps)                     # the trace is made on first use
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            traces.weights(steps)
            times.append((time.perf_counter() - t0) * 1000)
        result.append(statistics.median(times))
    return result


def latency(fly: Engine, built: Engine, x: torch.Tensor, seconds: float) -> dict:
    """Full-ensemble answers, alternating on the fly / pre-built, for about `seconds`."""
    request = InferenceRequest(inputs=x.numpy())
    times: dict[str, list[float]] = {"on_the_fly": [], "pre_built": []}
    order = [("on_the_fly", fly), ("pre_built", built)]
    start = time.perf_counter()
    while len(times["pre_built"]) < 3 or time.perf_counter() - start < seconds:
        for label, engine in order:
            t0 = time.perf_counter()
            engine.answer(request)
            times[label].append((time.perf_counter() - t0) * 1000)
        order.reverse()
    fly_ms, built_ms = (statistics.median(times[k]) for k in ("on_the_fly", "pre_built"))
    return {"pairs": len(times["pre_built"]), "on_the_fly_ms": fly_ms, "pre_built_ms": built_ms,
            "ratio": fly_ms / built_ms, "per_example_on_the_fly_ms": fly_ms / len(x)}


def measure(name: str, args: argparse.Namespace) -> dict:
    input_shape = FAMILIES[name]
    family = build_family(FamilySpec(family=name)).eval()
    fly = engine_for(family, name, input_shape, freeze=False)
    built = engine_for(family, name, input_shape, freeze=True)
    params = parameters(family)
    resident, frozen = fly.resident_bytes(), built.resident_bytes()
    limit = target_bytes(family)
    flops = count_flops(family, input_shape)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 20.0)
    rng = torch.Generator().manual_seed(0)
    return {
        "family": name, "members": family.names, "input_shape": list(input_shape),
        "parameters": params,
        "resident_bytes": {"on_the_fly": resident.total, "bank": resident.bank,
                           "coefficients": resident.coefficients, "norms_heads": resident.norms_heads,
                           "pre_built": frozen.total, "members_unshared": 4 * params["unshared_total"],
                           "limit": limit, "within_limit": resident.total <= limit},
        "generation_ms_per_member": dict(zip(family.names, generation_ms(family, input_shape, 3 if args.quick else 10))),
        "flops_per_example": {"members": dict(zip(family.names, (f[-1] for f in flops))),
                              "ensemble": sum(f[-1] for f in flops)},
        "latency": {str(batch): latency(fly, built, torch.randn(batch, *input_shape, generator=rng), seconds)
                    for batch in (1, 32)},
    }


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown(res: dict) -> str:
    rows = res["families"]
    head = "| | " + " | ".join(f"`{r['family']}` ({', '.join(r['members'])})" for r in rows) + " |"

    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(r) for r in rows) + " |"

    lines = [
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; load average {res['load_start']:.2f} at start, {res['load_end']:.2f} at end "
        f"(a shared machine: other work inflates wall times).", "",
        head, "|---|" + "---|" * len(rows),
        row("input shape", lambda r: "x".join(map(str, r["input_shape"]))),
        row("bank parameters", lambda r: _m(r["parameters"]["bank"])),
        row("+ coefficients, + norms and heads", lambda r: f"{_m(r['parameters']['coefficients'])}, "
                                                           f"{_m(r['parameters']['norms_heads'])}"),
        row("members unshared (total / per member)", lambda r: f"{_m(r['parameters']['unshared_total'])} / "
                                                               f"{_m(r['parameters']['unshared_total_per_member'])}"),
        row("resident bytes, on the fly", lambda r: f"{r['resident_bytes']['on_the_fly'] / 2**20:.2f} MiB"),
        row("bound: unshared / members + norms, heads", lambda r: f"{r['resident_bytes']['limit'] / 2**20:.2f} MiB "
            f"({'met' if r['resident_bytes']['within_limit'] else 'MISSED'})"),
        row("resident bytes, pre-built", lambda r: f"{r['resident_bytes']['pre_built'] / 2**20:.2f} MiB"),
        row("generation per member (ms)", lambda r: " / ".join(f"{v:.2f}" for v in r["generation_ms_per_member"].values())),
        row("MFLOPs per example, per member", lambda r: " / ".join(f"{v / 1e6:.1f}" for v in r["flops_per_example"]["members"].values())),
        row("MFLOPs per example, ensemble", lambda r: f"{r['flops_per_example']['ensemble'] / 1e6:.1f}"),
    ]
    for batch in ("1", "32"):
        lines.append(row(f"ensemble latency, batch {batch}: on the fly / pre-built (ms)",
                         lambda r, b=batch: f"{r['latency'][b]['on_the_fly_ms']:.1f} / {r['latency'][b]['pre_built_ms']:.1f}"))
        lines.append(row(f"ratio at batch {batch} (AB pairs)",
                         lambda r, b=batch: f"{r['latency'][b]['ratio']:.2f}x ({r['latency'][b]['pairs']})"))
    lines.append(row("generation share of on-the-fly batch-1 latency",
                     lambda r: f"{sum(r['generation_ms_per_member'].values()) / r['latency']['1']['on_the_fly_ms']:.0%}"))
    return "\n".join(lines)


def update_doc(doc: Path, res: dict) -> None:
    text = doc.read_text()
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{doc} has no costs block ({DOC_START} ... {DOC_END})")
    before, rest = text.split(DOC_START, 1)
    after = rest.split(DOC_END, 1)[1]
    doc.write_text(f"{before}{DOC_START}\n{markdown(res)}\n{DOC_END}{after}")


def main(argv=None) -> dict:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    load_start = os.getloadavg()[0]
    rows = [measure(name, args) for name in args.families]
    res = {"command": " ".join([".venv/bin/python benchmarks/costs.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                      f"{args.threads} torch thread(s)",
           "load_start": load_start, "load_end": os.getloadavg()[0], "elapsed_s": time.time() - started,
           "quick": args.quick, "families": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    if args.update_doc is not None:
        update_doc(args.update_doc, res)
    return res


if __name__ == "__main__":
    main()
