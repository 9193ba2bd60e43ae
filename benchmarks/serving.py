"""Serving benchmark: on-the-fly weights against pre-built ones, resident bytes, gRPC throughput, budgets.

    .venv/bin/python benchmarks/serving.py [CHECKPOINT] [--out benchmarks/results/serving.json] [--quick]

Four sections, all in one run, written to one JSON file:

1. `latency`: the engine answering a parsed request with weights generated on
   the fly (cache off, the default) against the same members frozen into plain
   PyTorch modules (`Family.freeze`) running the same work (every exit of every
   chosen member, softmax, mean), at batch 1 and 32, for the full ensemble and
   for each member. The two variants alternate (AB, BA, AB, ...) so that drift
   from other work on the machine hits both equally.
2. `resident`: `Engine.resident_bytes()` against the members' unshared weights.
3. `throughput`: requests/s and examples/s over gRPC, with a few client threads,
   for the embedded server and for TorchServe, each started as its own process on
   free loopback ports (TorchServe with token auth on).
4. `budget`: the share of requests with a `latency_budget_ms` (and the matching
   `deadline_unix_ms`, so queueing counts) that finished within it (`budget_met`),
   under a bounded concurrent load paced at half the server's measured capacity.

`--update-doc docs/serving.md` rewrites the figures block of that page from the
JSON just written, so the page never holds a number this command did not produce.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/support: what the tests start and send too
from tests.support import servers as launch  # noqa: E402
from tests.support.loadgen import Call, Run, run_load  # noqa: E402

TARGETS = {"ratio_batch32": 1.10, "ratio_batch1": 1.5, "budget_hit_rate": 0.99}
DOC_START, DOC_END = "<!-- figures:start (benchmarks/serving.py --update-doc) -->", "<!-- figures:end -->"


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, default=Path("runs/default"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    p.add_argument("--quick", action="store_true", help="small repetition counts: a smoke test, not figures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, in this process and in both servers (default: %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="AB pairs per latency cell (default 300; quick 10)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per throughput / budget run (default 400; quick 24)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads (default: %(default)s)")
    p.add_argument("--load-factor", type=float, default=0.5,
                   help="budget run: requests/s as this share of the server's measured batch-1 "
                        "full-ensemble throughput (default: %(default)s)")
    p.add_argument("--budget-factor", type=float, default=2.0,
                   help="latency_budget_ms = this x the measured batch-1 full-ensemble median (default: %(default)s)")
    p.add_argument("--no-torchserve", action="store_true", help="skip TorchServe (recorded as skipped)")
    p.add_argument("--update-doc", type=Path, default=None, help="rewrite the figures block of this markdown page")
    args = p.parse_args(argv)
    args.reps = args.reps or (10 if args.quick else 300)
    args.requests = args.requests or (24 if args.quick else 400)
    return args


# --- statistics -------------------------------------------------------------------------------
def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def machine(threads: int) -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {"nproc": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": threads,
            "loadavg_start": list(os.getloadavg())}


# --- 1. latency: on the fly against pre-built ---------------------------------------------------
def latency_section(engine, reps: int) -> dict:
    import torch

    from npas_serve.ensemble import combine
    from npas_serve.protocol.response import encode_request

    family, names, norm = engine.family, engine.names, engine.manifest.normalisation
    frozen = [family.freeze(m).eval() for m in range(len(names))]
    gen_s: list[float] = []
    engine.add_observer(lambda obs: gen_s.append(obs.generation_s))

    def plain(x: np.ndarray, chosen: list[int]) -> list[int]:
        """The same work in plain PyTorch: every exit of each member, last exit's softmax, mean."""
        with torch.inference_mode():
            h = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) - norm.mean) / norm.std
            probs = [frozen[m](h)[-1].softmax(dim=-1) for m in chosen]
            return combine(probs).predictions.tolist()

    rng = np.random.default_rng(0)
    cells = []
    for batch in (1, 32):
        x = rng.standard_normal((batch, *engine.limits.input_shape)).astype(np.float32)
        targets = [("ensemble", list(range(len(names))))] + [(n, [i]) for i, n in enumerate(names)]
        for label, chosen in targets:
            knobs = {"ensemble_size": len(names)} if label == "ensemble" else {"members": [label]}
            request = engine.parse({"data": encode_request(x, "json", **knobs)})
            ref = engine.answer(request)
            assert ref.predictions == plain(x, chosen), f"{label}: engine and frozen members disagree"
            for _ in range(3):        # warm both paths before timing
                engine.answer(request), plain(x, chosen)
            wall: tuple[list[float], list[float]] = ([], [])
            cpu: tuple[list[float], list[float]] = ([], [])
            gen_s.clear()
            faults = [0, 0]             # minor page faults: transient weights the allocator maps afresh
            for r in range(reps):
                for which in ((0, 1) if r % 2 == 0 else (1, 0)):    # AB, BA, ...: neither always first
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0, c0 = time.perf_counter_ns(), time.process_time_ns()
                    engine.answer(request) if which == 0 else plain(x, chosen)
                    c1, t1 = time.process_time_ns(), time.perf_counter_ns()
                    faults[which] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    wall[which].append((t1 - t0) / 1e6)
                    cpu[which].append((c1 - c0) / 1e6)
            a, b = summary(wall[0]), summary(wall[1])
            ca, cb = summary(cpu[0]), summary(cpu[1])
            cells.append({"batch": batch, "target": label, "members": [names[m] for m in chosen],
                          "on_the_fly": a, "prebuilt": b, "ratio": a["median_ms"] / b["median_ms"],
                          "ratio_p90": a["p90_ms"] / b["p90_ms"],
                          "paired_ratio_median": float(np.median(np.divide(wall[0], wall[1]))),
                          "cpu_on_the_fly": ca, "cpu_prebuilt": cb, "cpu_ratio": ca["median_ms"] / cb["median_ms"],
                          "generation_ms_median": float(np.median(gen_s)) * 1000,
                          "page_faults_per_request": {"on_the_fly": faults[0] / reps, "prebuilt": faults[1] / reps}})
    targets = {}
    for batch in (32, 1):
        limit, rows = TARGETS[f"ratio_batch{batch}"], [c for c in cells if c["batch"] == batch]
        full = next(c for c in rows if c["target"] == "ensemble")
        worst = max(c["ratio"] for c in rows)
        targets[f"batch{batch}"] = {"target": limit, "ensemble_ratio": full["ratio"], "worst_ratio": worst,
                                    "met": worst <= limit, "ensemble_cpu_ratio": full["cpu_ratio"],
                                    "worst_cpu_ratio": max(c["cpu_ratio"] for c in rows),
                                    "met_cpu": max(c["cpu_ratio"] for c in rows) <= limit}
    return {"reps": reps, "cells": cells, "targets": targets}


def count_ops(fn) -> dict[str, int]:
    """The aten operators `fn` dispatches, by name: what a call costs when each op's fixed cost dominates."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return dict(counts)


def generation_section(engine, reps: int) -> dict:
    """Per member: weights generated per request, the CPU time and aten ops of generating them alone,
    and the aten ops of one pre-built forward at batch 1 (the work generation is compared with)."""
    import torch

    family, out = engine.family, {}
    x = torch.zeros(1, *engine.limits.input_shape)
    for m, name in enumerate(engine.names):
        stages = range(engine.num_exits)
        frozen = family.freeze(m).eval()
        with torch.inference_mode():
            generate = lambda: [family.stage_weights(m, s) for s in stages]     # noqa: E731
            weights = sum(w.numel() for ws in generate() for w in ws)
            ms = []
            for _ in range(reps):
                c0 = time.process_time_ns()
                generate()
                ms.append((time.process_time_ns() - c0) / 1e6)
            gen_ops, fwd_ops = count_ops(generate), count_ops(lambda: frozen(x))
        out[name] = {"weights": weights, "cpu_ms_median": float(np.median(ms)),
                     "ops": sum(gen_ops.values()), "ops_by_name": gen_ops,
                     "prebuilt_forward_ops_batch1": sum(fwd_ops.values())}
    return out


# --- 2. resident bytes --------------------------------------------------------------------------
def resident_section(engine) -> dict:
    family = engine.family
    rb = engine.resident_bytes()
    elem = next(family.generator.parameters()).element_size()
    n = len(engine.names)
    shared = [c * elem for c in family.member_shared_numel()]
    unshared_total = sum(shared)
    target = unshared_total / n + rb.norms_heads
    return {"bank": rb.bank, "coefficients": rb.coefficients, "norms_heads": rb.norms_heads,
            "cache": rb.cache, "resident_total": rb.total, "members": n,
            "member_unshared_weight_bytes": dict(zip(engine.names, shared)),
            "unshared_total": unshared_total, "unshared_total_with_norms_heads": unshared_total + rb.norms_heads,
            "target": target, "met": rb.total <= target, "resident_over_unshared": rb.total / unshared_total}


# --- 3 and 4. load over gRPC --------------------------------------------------------------------
def load(target: str, token: str | None, x: np.ndarray, requests: int, clients: int,
         rate_per_s: float | None = None, budget_ms: float | None = None, **knobs) -> Run:
    """`requests` unary calls of `x` from `clients` threads after a warm-up (tests/support/loadgen.py).

    Without `rate_per_s` the clients send back to back (saturation: throughput). With it, request
    i leaves at t0 + i / rate_per_s (a paced, bounded load) and, given `budget_ms`, carries both
    `latency_budget_ms` and an absolute `deadline_unix_ms`, so time queued anywhere counts.
    """
    from npas_serve.client import Client

    with Client(target, token=token, timeout=60) as warm:     # warm the server and the channel
        for _ in range(3):
            warm.predict(x, **knobs)
    calls = [Call(x, knobs=knobs) for _ in range(requests)]
    return run_load(target, token, calls, clients, rate_per_s=rate_per_s, budget_ms=budget_ms)


def throughput(run: Run, batch: int) -> dict:
    ok = len(run.answered)
    client_ms = [r.latency_ms for r in run.answered]
    return {"batch": batch, "requests": ok, "errors": len(run.failed), "wall_s": run.wall_s,
            "requests_per_s": ok / run.wall_s, "examples_per_s": ok * batch / run.wall_s,
            "client_latency": summary(client_ms) if client_ms else None}


def budget_hits(run: Run, budget_ms: float) -> dict:
    answers = [r.answer for r in run.answered]
    met = sum(1 for a in answers if a.budget_met)
    client_met = sum(1 for r in run.answered if r.latency_ms <= budget_ms)
    n = len(answers)
    sizes = [len(a.members_used) for a in answers]
    return {"budget_ms": budget_ms, "requests": n, "errors": len(run.failed),
            "budget_met": met, "hit_rate": met / n if n else 0.0,
            "client_within_budget": client_met, "client_hit_rate": client_met / n if n else 0.0,
            "engine_latency": summary([a.latency_ms for a in answers]) if answers else None,
            "client_latency": summary([r.latency_ms for r in run.answered]) if answers else None,
            "members_used_mean": float(np.mean(sizes)) if sizes else 0.0,
            "members_used_histogram": {str(k): sizes.count(k) for k in sorted(set(sizes))},
            "met": bool(n) and met / n >= TARGETS["budget_hit_rate"] and not run.failed}


def server_sections(args, checkpoint: Path, input_shape, num_members: int, budget_ms: float) -> tuple[dict, dict]:
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rng = np.random.default_rng(1)
    tp, bud = {}, {}
    servers = [("embedded", lambda: launch.running_embedded(checkpoint, env))]
    if args.no_torchserve:
        tp["torchserve"] = bud["torchserve"] = {"skipped": "--no-torchserve"}
    elif shutil.which("java") is None:
        tp["torchserve"] = bud["torchserve"] = {"skipped": "java is not on PATH"}
    else:
        servers.append(("torchserve", lambda: launch.running_torchserve(checkpoint, env=env)))
    for kind, start in servers:
        t0 = time.perf_counter()
        try:
            with start() as launched:
                target, token = launched.target, launched.token
                started = time.perf_counter() - t0
                runs = []
                for batch in (1, 32):
                    x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
                    run = load(target, token, x, args.requests, args.clients, ensemble_size=num_members)
                    runs.append(throughput(run, batch))
                tp[kind] = {"start_s": started, "clients": args.clients, "runs": runs}
                # a bounded load the server can sustain: half its batch-1 full-ensemble capacity
                rate = args.load_factor * runs[0]["requests_per_s"]
                x = rng.standard_normal((1, *input_shape)).astype(np.float32)
                run = load(target, token, x, args.requests, args.clients, rate_per_s=rate, budget_ms=budget_ms)
                bud[kind] = {"clients": args.clients, "rate_per_s": rate, **budget_hits(run, budget_ms)}
        except Exception as exc:      # one server failing must not lose the other figures
            failed = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
            tp.setdefault(kind, failed)
            bud.setdefault(kind, failed)
    return tp, bud


# --- report -------------------------------------------------------------------------------------
def render(res: dict) -> str:
    """The markdown figures block of docs/serving.md, from the JSON only."""
    m, lat, rb = res["machine"], res["latency"], res["resident"]
    out = [f"Command: `{res['command']}`  ",
           f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, {m['torch_threads']} torch "
           f"thread(s); load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
           f"{' (--quick: smoke-test counts, not figures)' if res['quick'] else ''}.", "",
           f"**Latency** (ms, {lat['reps']} interleaved pairs per row; ratio = median on the fly / median "
           "pre-built; CPU = process CPU time, which other work on the machine does not inflate)", "",
           "| batch | members | on the fly median | p90 | pre-built median | p90 | ratio | CPU on the fly "
           "| CPU pre-built | CPU ratio | generation median |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in lat["cells"]:
        a, b, ca, cb = c["on_the_fly"], c["prebuilt"], c["cpu_on_the_fly"], c["cpu_prebuilt"]
        out.append(f"| {c['batch']} | {c['target']} | {a['median_ms']:.2f} | {a['p90_ms']:.2f} | "
                   f"{b['median_ms']:.2f} | {b['p90_ms']:.2f} | {c['ratio']:.2f}x | {ca['median_ms']:.2f} | "
                   f"{cb['median_ms']:.2f} | {c['cpu_ratio']:.2f}x | {c['generation_ms_median']:.2f} |")
    t = lat["targets"]
    out += ["", "| target | limit | full ensemble | worst row | met | CPU: full ensemble | CPU: worst row "
            "| met (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for b in ("batch32", "batch1"):
        out.append(f"| on the fly / pre-built, {b.replace('batch', 'batch ')} | <= {t[b]['target']:.2f}x | "
                   f"{t[b]['ensemble_ratio']:.2f}x | {t[b]['worst_ratio']:.2f}x | {'yes' if t[b]['met'] else 'no'} | "
                   f"{t[b]['ensemble_cpu_ratio']:.2f}x | {t[b]['worst_cpu_ratio']:.2f}x | "
                   f"{'yes' if t[b]['met_cpu'] else 'no'} |")
    out += ["", "**Generation alone** (per member, every stage, batch-independent; CPU time; aten ops dispatched)",
            "", "| member | weights generated | CPU median ms | aten ops | of which products / cat / views "
            "| pre-built forward ops (batch 1) |", "|---|---|---|---|---|---|"]
    for name, g in res["generation"].items():
        by = g["ops_by_name"]
        views = sum(by.get(k, 0) for k in ("view", "select", "slice", "unbind", "_unsafe_view"))
        out.append(f"| {name} | {g['weights']:,} | {g['cpu_ms_median']:.2f} | {g['ops']} | "
                   f"{by.get('matmul', 0) + by.get('mm', 0)} / {by.get('cat', 0)} / {views} | "
                   f"{g['prebuilt_forward_ops_batch1']} |")
    out += ["", "**Resident bytes** (cache off)", "", "| bank | coefficients | norms + heads | resident total "
            "| members' unshared weights | target (unshared / N + norms + heads) | met |", "|---|---|---|---|---|---|---|",
            f"| {rb['bank']:,} | {rb['coefficients']:,} | {rb['norms_heads']:,} | {rb['resident_total']:,} | "
            f"{rb['unshared_total']:,} (N = {rb['members']}) | {rb['target']:,.0f} | {'yes' if rb['met'] else 'no'} |",
            "", f"**Throughput over gRPC** (full ensemble, {res['config']['clients']} client threads, "
            f"{res['config']['requests']} requests per row)", "",
            "| server | batch | requests/s | examples/s | client median ms | p90 | errors |", "|---|---|---|---|---|---|---|"]
    for kind, sec in res["throughput"].items():
        if "skipped" in sec:
            out.append(f"| {kind} | skipped: {sec['skipped']} | | | | | |")
            continue
        for r in sec["runs"]:
            cl = r["client_latency"] or {"median_ms": float("nan"), "p90_ms": float("nan")}
            out.append(f"| {kind} | {r['batch']} | {r['requests_per_s']:.1f} | {r['examples_per_s']:.1f} | "
                       f"{cl['median_ms']:.2f} | {cl['p90_ms']:.2f} | {r['errors']} |")
    out += ["", f"**Budget hit rate** (batch 1, {res['config']['clients']} client threads, "
            f"paced at {res['config']['load_factor']} x each server's batch-1 throughput, "
            f"latency_budget_ms = {res['config']['budget_factor']} x the batch-1 full-ensemble median, "
            f"sent with the matching deadline_unix_ms so queueing counts)", "",
            "| server | budget ms | requests | budget_met | hit rate | within budget at the client | "
            "members used (mean) | engine p90 ms | met (>= 99%) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, sec in res["budget"].items():
        if "skipped" in sec:
            out.append(f"| {kind} | skipped: {sec['skipped']} | | | | | | | |")
            continue
        el = sec["engine_latency"] or {"p90_ms": float("nan")}
        out.append(f"| {kind} | {sec['budget_ms']:.2f} | {sec['requests']} | {sec['budget_met']} | "
                   f"{sec['hit_rate']:.1%} | {sec['client_hit_rate']:.1%} | {sec['members_used_mean']:.2f} | "
                   f"{el['p90_ms']:.2f} | {'yes' if sec['met'] else 'no'} |")
    return "\n".join(out)


def update_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else f"{DOC_START}\n{DOC_END}\n"
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path} has no figures block ({DOC_START} ... {DOC_END})")
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    path.write_text(f"{head}{DOC_START}\n{block}\n{DOC_END}{tail}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from npas_serve.engine import Engine, EngineConfig

    checkpoint = args.checkpoint.resolve()
    if not (checkpoint / "manifest.json").is_file():
        raise SystemExit(f"{checkpoint} is not a checkpoint; train one with `npas-serve train --out {args.checkpoint}`")
    command = " ".join([".venv/bin/python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    res = {"command": command, "checkpoint": str(checkpoint), "quick": args.quick, "machine": machine(args.threads),
           "config": {"reps": args.reps, "requests": args.requests, "clients": args.clients,
                      "budget_factor": args.budget_factor, "load_factor": args.load_factor, "cache_bytes": 0}, "targets": TARGETS}
    t0 = time.perf_counter()
    engine = Engine.load(checkpoint, EngineConfig(cache_bytes=0))
    res["engine_load_s"] = time.perf_counter() - t0
    res["latency"] = latency_section(engine, args.reps)
    res["resident"] = resident_section(engine)
    res["generation"] = generation_section(engine, max(args.reps // 3, 5))
    ensemble_b1 = next(c for c in res["latency"]["cells"] if c["batch"] == 1 and c["target"] == "ensemble")
    budget_ms = args.budget_factor * ensemble_b1["on_the_fly"]["median_ms"]
    res["config"]["budget_ms"] = budget_ms
    input_shape, members = engine.limits.input_shape, len(engine.names)
    del engine    # free the cores' caches for the servers
    res["throughput"], res["budget"] = server_sections(args, checkpoint, input_shape, members, budget_ms)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    block = render(res)
    print(block)
    print(f"\nresults -> {args.out}")
    if args.update_doc:
        update_doc(args.update_doc, block)
        print(f"figures -> {args.update_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
