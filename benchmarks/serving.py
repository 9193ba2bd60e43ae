"""Serving benchmark: the engine in-process, both servers under load, budgets and overload, in one run.

    .venv/bin/python benchmarks/serving.py [CHECKPOINT] [--out benchmarks/results/serving.json] [--quick]

Sections, all written to one JSON file (and a plot next to it, same name, .png):

1. `latency` (in-process, cache off): `Engine.answer` generating weights on the fly against the
   same members frozen into plain PyTorch modules (`Family.freeze`) doing the same work, and
   against the engine serving frozen members (`EngineConfig(freeze=True)`: the same engine path,
   only generation removed), at batch 1 and 32, the full ensemble and each member. The arms
   alternate (ABC, BCA, CAB, ...) so drift from other work on the machine hits all of them.
   `ceiling`: the plain pre-built ensemble's examples/s at batch 32, the reference for the servers.
2. `generation`: per member and for every member at once, the weights generated, their CPU time
   and the aten operators dispatched, against one pre-built forward's.
3. `resident`: `Engine.resident_bytes()` against the members' unshared weights, and what a batch
   leaves behind (nothing generated may outlive it).
4. `servers`: the embedded server and TorchServe, each started as its own process with its
   DEFAULT settings (no thread or batching flags), on free loopback ports (TorchServe with token
   auth on), each warmed to its steady state first (`warm`: TorchServe's JVM frontend needs some
   thousand calls): closed-loop batch-1 requests from 1, 4, 16 and 64 clients and batch-32 requests
   from 1 and 4 clients (throughput, client p50/p99, Little's law); then, each server restarted, paced
   batch-1 loads at 50% and 90% of its measured capacity (its best batch-1 round) with a budget and the matching deadline
   sent (the share answered within the budget at the client), and at 150% (overload: every call
   must end in an answer, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, none lost). The budget is one
   for both servers (the user's: `--budget-factor` x the slower server's 1-client p50); the faster
   server also runs 50% and 90% under its own, tighter one, reported beside it. Every load but the
   overload runs `--rounds` times, the rounds interleaved; a closed loop is reported by its median
   round, a paced share by its rounds' median share within budget.
5. `must_show`: the ratios issue 10 asks for, each with its limit and whether it was met.

`--update-doc docs/serving.md` rewrites the figures block of that page from the JSON just written,
so the page never holds a number this command did not produce.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/support: what the tests start and send too
from tests.support import servers as launch  # noqa: E402
from tests.support.loadgen import Call, Run, run_load  # noqa: E402

DOC_START, DOC_END = "<!-- figures:start (benchmarks/serving.py --update-doc) -->", "<!-- figures:end -->"
CLIENTS_B1, CLIENTS_B32, PACED = (1, 4, 16, 64), (1, 4), (0.5, 0.9, 1.5)
REFUSALS = ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")     # the clear answers a server may give past capacity
# Before issue 10 (docs/serving.md at 3f24ff7): TorchServe answered 91.5 batch-1 requests/s from 4 clients,
# its best figure (throughput fell as clients were added); issue 10 asks for 3x that at 16 clients. The
# same run's in-process pre-built ensemble took 13.58 ms at batch 32 (2,356 examples/s). These shared
# machines differ between days by up to 3x in speed, so the figure is compared as a share of the same
# run's ceiling: TorchServe's 16-client throughput / ceiling, against 91.5 / 2,356 then.
TORCHSERVE_BEFORE_REQ_S, CEILING_BEFORE = 91.5, 32_000 / 13.58
# each server is warmed to its steady state before it is measured (`warm`)
WARM_CLIENTS, WARM_WINDOW_S, WARM_MAX_S, WARM_FLAT, WARM_RISE = 16, 2.0, 60.0, 3, 1.05
LIMITS = {"embedded_16_over_ceiling": 0.25, "p99_over_little": 2.0, "torchserve_16_over_before": 3.0,
          "ratio_batch1": 1.2, "ratio_batch32": 1.05, "budget_50": 0.99, "budget_90": 0.95}


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, default=Path("runs/default"),
                   help="a trained checkpoint directory (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"),
                   help="the JSON written; the plot goes next to it as .png (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small counts and short loads: a smoke test, not figures")
    p.add_argument("--device", default="cpu", help="device of the in-process sections (cpu, cuda); servers: default")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per latency cell (default 150; quick 6)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds of each server load (default 8; quick 0.5)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of every server load below capacity, interleaved; the figures are their median "
                        "(default 3; quick 2)")
    p.add_argument("--budget-factor", type=float, default=3.0,
                   help="the paced loads' latency_budget_ms = this x the slower server's 1-client batch-1 p50, "
                        "one budget for both (default: %(default)s)")
    p.add_argument("--no-torchserve", action="store_true", help="skip TorchServe (recorded as skipped)")
    p.add_argument("--update-doc", type=Path, default=None, help="rewrite the figures block of this markdown page")
    args = p.parse_args(argv)
    args.reps = args.reps or (6 if args.quick else 150)
    args.seconds = args.seconds or (0.5 if args.quick else 8.0)
    args.rounds = (2 if args.quick else 3) if args.rounds is None else args.rounds
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.warm_s = (0.25, 1.0) if args.quick else (WARM_WINDOW_S, WARM_MAX_S)    # window, at most
    return args


# --- statistics -------------------------------------------------------------------------------
def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(a.size)}


def machine(device: str) -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    out = {"nproc": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
           "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
           "device": device, "loadavg_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        out["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return out


def cpu_times() -> list[int] | None:
    """This machine's CPU time so far by kind (/proc/stat: user, nice, system, idle, iowait, irq,
    softirq, steal, ...); None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def server_cpu_s(launched) -> float | None:
    """A server's CPU seconds so far, its engine's process included; None where there is no /proc."""
    return launch.process_cpu_s(launched.pid) if os.path.isdir("/proc/self/task") else None


def stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the machine's CPU time between two `cpu_times`, the share its hypervisor gave to other
    guests (steal). On a shared virtual machine a load measured while neighbours take the cores is
    slower for reasons not its own: on 12-03, in 22 paced loads of the embedded server at 650
    requests/s (about 80% of its capacity that day), 31-66% of the calls were answered within budget
    in the 8 loads with 8-20% of the CPU stolen, and 84-98% in the 14 with 2% or less."""
    if before is None or after is None or len(before) < 8:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return spent[7] / sum(spent) if sum(spent) else 0.0


def measured(fn, *args, **kwargs) -> tuple[object, float | None]:
    """`fn(*args, **kwargs)` and the share of the machine's CPU stolen while it ran."""
    before = cpu_times()
    return fn(*args, **kwargs), stolen_share(before, cpu_times())


# --- 1. latency: on the fly against pre-built -----------------------------------------------------
ARMS = ("on_the_fly", "prebuilt", "engine_frozen", "prebuilt_traced")


def latency_section(engine, frozen_engine, reps: int) -> dict:
    import torch

    from npas_serve.ensemble import combine
    from npas_serve.protocol.response import encode_request

    family, names, norm, device = engine.family, engine.names, engine.manifest.normalisation, engine.device
    frozen = [family.freeze(m).eval().requires_grad_(False) for m in range(len(names))]
    # the same members as TorchScript traces: the pre-built arm with the engine's own technique (fairness)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # tracer and deprecation notices
        example = torch.zeros(2, *engine.limits.input_shape, device=device)
        traced = [torch.jit.trace(lambda h, m=m: frozen[m](h)[-1].softmax(dim=-1), (example,), check_trace=False)
                  for m in range(len(names))]
    gen_s: list[float] = []
    engine.add_observer(lambda obs: gen_s.append(obs.generation_s))

    def plain(x: np.ndarray, chosen: list[int]) -> list[int]:
        """The same work in plain PyTorch: every exit of each member, last exit's softmax, mean."""
        with torch.inference_mode():
            h = torch.from_numpy(norm.apply(x)).to(device)
            probs = [frozen[m](h)[-1].softmax(dim=-1) for m in chosen]
            return combine(probs).predictions.tolist()

    def plain_traced(x: np.ndarray, chosen: list[int]) -> list[int]:
        with torch.inference_mode():
            h = torch.from_numpy(norm.apply(x)).to(device)
            return combine([traced[m](h) for m in chosen]).predictions.tolist()

    rng = np.random.default_rng(0)
    cells = []
    for batch in (1, 32):
        x = rng.standard_normal((batch, *engine.limits.input_shape)).astype(np.float32)
        targets = [("ensemble", list(range(len(names))))] + [(n, [i]) for i, n in enumerate(names)]
        for label, chosen in targets:
            knobs = {"ensemble_size": len(names)} if label == "ensemble" else {"members": [label]}
            request = engine.parse({"data": encode_request(x, "json", **knobs)})
            ref = engine.answer(request)
            assert ref.predictions == plain(x, chosen) == plain_traced(x, chosen), \
                f"{label}: engine and frozen members disagree"
            arms = (lambda: engine.answer(request), lambda: plain(x, chosen), lambda: frozen_engine.answer(request),
                    lambda: plain_traced(x, chosen))
            for _ in range(3):        # warm every path before timing
                for arm in arms:
                    arm()
            wall = {a: [] for a in ARMS}
            cpu = {a: [] for a in ARMS}
            gen_s.clear()
            faults = {a: 0 for a in ARMS}     # minor page faults: transient weights the allocator maps afresh
            for r in range(reps):
                for i in range(len(ARMS)):    # ABCD, BCDA, CDAB, ...: no arm always first
                    which = (r + i) % len(ARMS)
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0, c0 = time.perf_counter_ns(), time.process_time_ns()
                    arms[which]()
                    c1, t1 = time.process_time_ns(), time.perf_counter_ns()
                    faults[ARMS[which]] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    wall[ARMS[which]].append((t1 - t0) / 1e6)
                    cpu[ARMS[which]].append((c1 - c0) / 1e6)
            walls = {a: summary(wall[a]) for a in ARMS}
            cpus = {a: summary(cpu[a]) for a in ARMS}
            cells.append({"batch": batch, "target": label, "members": [names[m] for m in chosen],
                          **walls, "ratio": walls["on_the_fly"]["median_ms"] / walls["prebuilt"]["median_ms"],
                          "ratio_engine_frozen": walls["on_the_fly"]["median_ms"] / walls["engine_frozen"]["median_ms"],
                          "ratio_prebuilt_traced": walls["on_the_fly"]["median_ms"] / walls["prebuilt_traced"]["median_ms"],
                          "paired_ratio_median": float(np.median(np.divide(wall["on_the_fly"], wall["prebuilt"]))),
                          "cpu": cpus, "cpu_ratio": cpus["on_the_fly"]["median_ms"] / cpus["prebuilt"]["median_ms"],
                          "generation_ms_median": float(np.median(gen_s)) * 1000,
                          "page_faults_per_request": {a: faults[a] / reps for a in ARMS}})
    full32 = next(c for c in cells if c["batch"] == 32 and c["target"] == "ensemble")
    ceiling = {"batch": 32, "examples_per_s": 32 * 1000 / full32["prebuilt"]["median_ms"],
               "engine_on_the_fly_examples_per_s": 32 * 1000 / full32["on_the_fly"]["median_ms"]}
    return {"reps": reps, "cells": cells, "ceiling": ceiling}


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


def _cpu_ms(fn, reps: int) -> float:
    ms = []
    for _ in range(reps):
        c0 = time.process_time_ns()
        fn()
        ms.append((time.process_time_ns() - c0) / 1e6)
    return float(np.median(ms))


def generation_section(engine, reps: int) -> dict:
    """Per member (one call per stage, as a lone request's steps) and for every member at once (one
    call, as a batch's `prepare`): weights generated, CPU time, aten ops; against a pre-built forward."""
    import torch

    family, out = engine.family, {}
    x = torch.zeros(1, *engine.limits.input_shape, device=engine.device)
    every = [(m, s) for m in range(len(engine.names)) for s in range(engine.num_exits)]
    with torch.inference_mode():
        for m, name in enumerate(engine.names):
            stages = range(engine.num_exits)
            frozen = family.freeze(m).eval()
            generate = lambda: [family.stage_weights(m, s) for s in stages]     # noqa: E731
            gen_ops, fwd_ops = count_ops(generate), count_ops(lambda: frozen(x))
            out[name] = {"weights": sum(w.numel() for ws in generate() for w in ws),
                         "cpu_ms_median": _cpu_ms(generate, reps), "ops": sum(gen_ops.values()),
                         "ops_by_name": gen_ops, "prebuilt_forward_ops_batch1": sum(fwd_ops.values())}
        together = lambda: family.steps_weights(every)     # noqa: E731
        ops = count_ops(together)
        out["every member at once"] = {
            "weights": sum(w.numel() for ws in together() for w in ws), "cpu_ms_median": _cpu_ms(together, reps),
            "ops": sum(ops.values()), "ops_by_name": ops,
            "prebuilt_forward_ops_batch1": sum(v["prebuilt_forward_ops_batch1"] for v in out.values())}
    return out


# --- 3. resident bytes --------------------------------------------------------------------------
def resident_section(engine) -> dict:
    from npas_serve.engine.memory import target_bytes

    family = engine.family
    rb = engine.resident_bytes()
    elem = next(family.generator.parameters()).element_size()
    n = len(engine.names)
    shared = [c * elem for c in family.member_shared_numel()]
    unshared_total = sum(shared)
    target = target_bytes(family)
    # what the last batch's generation left behind: must be nothing. A caller has its final answer
    # before the device thread has ended the batch, so first wait for the device to be idle
    until = time.monotonic() + 10
    while engine.scheduler.ahead_examples() and time.monotonic() < until:
        time.sleep(0.001)
    left = engine._stages._prepared
    return {"bank": rb.bank, "coefficients": rb.coefficients, "norms_heads": rb.norms_heads,
            "cache": rb.cache, "resident_total": rb.total, "members": n,
            "member_unshared_weight_bytes": dict(zip(engine.names, shared)),
            "unshared_total": unshared_total, "unshared_total_with_norms_heads": unshared_total + rb.norms_heads,
            "target": target, "met": rb.total <= target and not left,
            "transient_weights_left_after_batch": len(left), "resident_over_unshared": rb.total / unshared_total}


# --- 4. servers under load ----------------------------------------------------------------------
def load(target: str, token: str | None, x: np.ndarray, clients: int, seconds: float,
         rate_per_s: float | None = None, budget_ms: float | None = None, **knobs) -> Run:
    """Closed loop (`clients` threads back to back) for `seconds`, or, with `rate_per_s`, a paced load
    of ``rate * seconds`` calls (call i leaves at t0 + i / rate) carrying `latency_budget_ms` and the
    matching absolute `deadline_unix_ms`, so time queued anywhere counts (tests/support/loadgen.py)."""
    if rate_per_s is None:
        calls = [Call(x, knobs=knobs) for _ in range(100_000)]
        return run_load(target, token, calls, clients, deadline_s=seconds)
    calls = [Call(x, knobs=knobs) for _ in range(max(1, int(rate_per_s * seconds)))]
    return run_load(target, token, calls, clients, rate_per_s=rate_per_s, budget_ms=budget_ms)


def warm(launched, x: np.ndarray, window_s: float, max_s: float, **knobs) -> dict:
    """Closed-loop windows of WARM_CLIENTS clients until neither the throughput rises nor the server's
    CPU per call falls (WARM_FLAT windows in a row with neither past WARM_RISE of its best before it),
    for at most `max_s`: each server is measured in its steady state, as it runs in production.
    TorchServe's frontend is a JVM whose JIT compiles its hot paths only after some thousand calls:
    fresh, it spent 8 ms of CPU per call, against 1-2 ms after 3,000 calls, and a paced load at half
    capacity went from 74% within budget to 99.5%. Its throughput flattens before its compiler is
    done: in five 8 s paced loads after it had, the compiler thread took 1.1, 0.9, 0.4, 0 and 0 s of
    CPU, and the share within budget rose from 99.1% to 99.6% (the CPU per call shows it)."""
    best, least, flat, windows, per_call, calls, t0 = 0.0, math.inf, 0, [], [], 0, time.monotonic()
    while flat < WARM_FLAT and time.monotonic() - t0 < max_s:
        cpu = server_cpu_s(launched)
        run = load(launched.target, launched.token, x, WARM_CLIENTS, window_s, **knobs)
        rate, calls = len(run.answered) / run.wall_s, calls + len(run.results)
        # without /proc the CPU per call reads 0 and the warm-up follows throughput only
        cpu_ms = 0.0 if cpu is None else (server_cpu_s(launched) - cpu) * 1000 / max(1, len(run.results))
        windows.append(round(rate, 1))
        per_call.append(round(cpu_ms, 3))
        flat = flat + 1 if rate <= WARM_RISE * best and cpu_ms * WARM_RISE >= least else 0
        best, least = max(best, rate), min(least, cpu_ms)
    return {"windows_req_s": windows, "server_cpu_ms_per_call": per_call, "calls": calls,
            "seconds": time.monotonic() - t0}


def expired_load(launched, x: np.ndarray, clients: int, seconds: float, **knobs) -> dict:
    """A closed loop of calls whose deadline passed a minute before they were sent: what refusing a
    call nobody waits for costs the server (its processes' CPU a call). An overloaded server spends
    its time on such calls: they wait in its queue past their deadline, then must still be refused."""
    before = server_cpu_s(launched)
    run = load(launched.target, launched.token, x, clients, seconds, deadline_unix_ms=time.time() * 1000 - 60_000,
               **knobs)
    calls = len(run.results)
    cpu_ms = None if before is None or not calls else (server_cpu_s(launched) - before) * 1000 / calls
    return {"clients": clients, "calls": calls, "answered": len(run.answered), "error_codes": _codes(run),
            "requests_per_s": calls / run.wall_s, "server_cpu_ms_per_call": cpu_ms}


def closed_loop(run: Run, stolen: float | None, batch: int, clients: int) -> dict:
    ok = len(run.answered)
    ms = [r.latency_ms for r in run.answered]
    out = {"batch": batch, "clients": clients, "requests": ok, "errors": len(run.failed), "cpu_stolen": stolen,
           "error_codes": _codes(run), "error_examples": _examples(run), "wall_s": run.wall_s,
           "requests_per_s": ok / run.wall_s,
           "examples_per_s": ok * batch / run.wall_s, "client_latency": summary(ms) if ms else None}
    if ms:     # Little's law: with `clients` always waiting, the mean latency is clients / throughput
        out["little_mean_ms"] = clients / out["requests_per_s"] * 1000
        out["p99_over_little"] = out["client_latency"]["p99_ms"] / out["little_mean_ms"]
    return out


def median_round(rounds: list[dict]) -> dict:
    """Of one closed loop's rounds, the one with the median requests/s (the lower of an even count),
    with every round's requests/s and CPU stolen beside it. One 8 s load on a shared machine moves
    with its neighbours: in one run of 12-03 the three rounds of a 64-client loop made 848, 540 and
    628 requests/s with 0%, 24% and 11% of the CPU stolen."""
    ranked = sorted(rounds, key=lambda r: r["requests_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_req_s": [r["requests_per_s"] for r in rounds],
            "rounds_cpu_stolen": [r["cpu_stolen"] for r in rounds]}


def _codes(run: Run) -> dict[str, int]:
    codes: dict[str, int] = {}
    for r in run.failed:
        code = getattr(r.error, "code", type(r.error).__name__)
        codes[code] = codes.get(code, 0) + 1
    return codes


def _examples(run: Run) -> dict[str, str]:
    """The first message of each error code, so a run's errors can be read, not only counted."""
    out: dict[str, str] = {}
    for r in run.failed:
        out.setdefault(getattr(r.error, "code", type(r.error).__name__), str(r.error)[:200])
    return out


def paced(run: Run, sent: int, budget_ms: float, share: float, rate: float) -> dict:
    answers = run.answered
    within = sum(1 for r in answers if r.latency_ms <= budget_ms)
    late = [r for r in answers if r.latency_ms > budget_ms]
    codes = _codes(run)
    refused = sum(codes.get(c, 0) for c in REFUSALS)
    other = len(run.failed) - refused
    sizes = [len(r.answer.members_used) for r in answers]
    return {"share_of_capacity": share, "rate_per_s": rate, "budget_ms": budget_ms, "sent": sent,
            "offered_per_s": len(run.results) / run.wall_s,     # below rate_per_s when every client waits
            "answered": len(answers), "refused": refused, "other_errors": other, "error_codes": codes,
            "error_examples": _examples(run),
            "lost": sent - len(answers) - len(run.failed),
            "client_within_budget": within, "client_hit_rate": within / sent if sent else 0.0,
            "engine_budget_met": sum(1 for r in answers if r.answer.budget_met),
            # where the late answers lost their time: the engine's own verdict (its budget is what the
            # deadline leaves after the way in and the way back), and the client's time outside the engine
            "late": len(late), "late_engine_said_met": sum(1 for r in late if r.answer.budget_met),
            "outside_engine": summary([r.latency_ms - r.answer.latency_ms for r in answers]) if answers else None,
            "client_latency": summary([r.latency_ms for r in answers]) if answers else None,
            "members_used_mean": float(np.mean(sizes)) if sizes else 0.0}


def closed_section(start, input_shape, members: int, seconds: float, rounds: int,
                   warm_s: tuple[float, float]) -> dict:
    """Closed loops: batch-1 requests from CLIENTS_B1 clients, batch-32 from CLIENTS_B32, `rounds`
    times in turn; each reported by its median round."""
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((1, *input_shape)).astype(np.float32)
    x32 = rng.standard_normal((32, *input_shape)).astype(np.float32)
    cells = [(x1, 1, c) for c in CLIENTS_B1] + [(x32, 32, c) for c in CLIENTS_B32]
    full = {"ensemble_size": members}
    t0 = time.perf_counter()
    with start() as launched:
        target, token = launched.target, launched.token
        out = {"start_s": time.perf_counter() - t0, "warm_up": warm(launched, x1, *warm_s, **full)}
        runs = [[closed_loop(*measured(load, target, token, x, c, seconds, **full), batch, c) for x, batch, c in cells]
                for _ in range(rounds)]
        out["expired"] = expired_load(launched, x1, 16, seconds, **full)
    rows = [median_round([r[i] for r in runs]) for i in range(len(cells))]
    out["batch1"], out["batch32"] = rows[:len(CLIENTS_B1)], rows[len(CLIENTS_B1):]
    # the capacity is the best batch-1 round, not the median: neighbours only ever slow a load down,
    # and the paced rates follow the capacity (the median of the rounds in `median_round`'s example,
    # 628 requests/s, set rates a quarter below what the server answered on a quiet machine)
    best = max((r for rounds in runs for r in rounds[:len(CLIENTS_B1)]), key=lambda r: r["requests_per_s"])
    out["capacity_req_s"], out["capacity_cpu_stolen"] = best["requests_per_s"], best["cpu_stolen"]
    out["capacity_clients"] = best["clients"]
    out["p50_1_client_ms"] = out["batch1"][0]["client_latency"]["median_ms"]
    return out


def paced_section(start, input_shape, members: int, seconds: float, rounds: int, capacity: float,
                  budgets: dict[str, float], warm_s: tuple[float, float]) -> tuple[dict, list[dict]]:
    """Paced batch-1 loads with a budget and its deadline: `rounds` times in turn, at every share of
    PACED below capacity under each budget of `budgets`; then once past capacity (overload, whose
    refusals would disturb the loads after it) under the `user` budget."""
    x1 = np.random.default_rng(1).standard_normal((1, *input_shape)).astype(np.float32)
    below = [(i, name, budget_ms, share) for i in range(rounds) for name, budget_ms in budgets.items()
             for share in PACED if share < 1]
    past = [(0, "user", budgets["user"], share) for share in PACED if share >= 1]
    out = []
    with start() as launched:
        target, token = launched.target, launched.token
        warm_up = warm(launched, x1, *warm_s, ensemble_size=members)
        for i, name, budget_ms, share in below + past:
            rate = share * capacity
            sent = max(1, int(rate * seconds))
            before = device_seconds(launched.metrics_url)
            run, stolen = measured(load, target, token, x1, 64, seconds, rate_per_s=rate, budget_ms=budget_ms)
            busy, cpu = (a - b for a, b in zip(device_seconds(launched.metrics_url), before))
            out.append({"budget": name, "round": i, **paced(run, sent, budget_ms, share, rate), "cpu_stolen": stolen,
                        # the device thread: its share of the load's time at work, and its CPU time then
                        "device_busy_share": busy / run.wall_s, "device_cpu_of_busy": cpu / busy if busy else None})
    return warm_up, out


def device_seconds(metrics_url: str) -> tuple[float, float]:
    """The server's `npas_device_busy_seconds_total` and `npas_device_cpu_seconds_total`, from /metrics."""
    return (launch.metric_sum(metrics_url, "npas_device_busy_seconds_total"),
            launch.metric_sum(metrics_url, "npas_device_cpu_seconds_total"))


def servers(args, checkpoint: Path, input_shape, members: int) -> dict:
    """Both servers with their default settings: no OMP/MKL variables, no batching flags.

    First each server's closed loops; then, each server started afresh, the paced loads under one
    budget for both: the user's (`--budget-factor` x the slower server's 1-client p50), since a
    budget belongs to the application, not to the server that happens to serve it. A server faster
    than that also runs under its own (`--budget-factor` x its own p50), reported beside it.
    """
    out: dict = {}
    starts = {"embedded": lambda: launch.running_embedded(checkpoint)}
    if args.no_torchserve:
        out["torchserve"] = {"skipped": "--no-torchserve"}
    elif shutil.which("java") is None:
        out["torchserve"] = {"skipped": "java is not on PATH"}
    else:
        starts["torchserve"] = lambda: launch.running_torchserve(checkpoint)
    for kind, start in list(starts.items()):
        try:
            out[kind] = closed_section(start, input_shape, members, args.seconds, args.rounds, args.warm_s)
        except Exception as exc:      # one server failing must not lose the other figures
            out[kind] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
            del starts[kind]
    if starts:
        user_ms = args.budget_factor * max(out[kind]["p50_1_client_ms"] for kind in starts)
        for kind, start in starts.items():
            sec = out[kind]
            own_ms = args.budget_factor * sec["p50_1_client_ms"]
            budgets = {"user": user_ms, **({"own": own_ms} if own_ms < 0.9 * user_ms else {})}
            sec.update(budget_ms=user_ms, own_budget_ms=own_ms)
            try:
                sec["paced_warm_up"], sec["paced"] = paced_section(start, input_shape, members, args.seconds,
                                                                   args.rounds, sec["capacity_req_s"], budgets,
                                                                   args.warm_s)
            except Exception as exc:
                sec["paced"], sec["paced_failed"] = [], f"{type(exc).__name__}: {str(exc)[:300]}"
    return dict(sorted(out.items()))


# --- 5. what issue 10 asks for --------------------------------------------------------------------
def must_show(res: dict) -> list[dict]:
    rows = []

    def add(name: str, value: float | None, limit: float, at_least: bool, note: str = "") -> None:
        met = value is not None and (value >= limit if at_least else value <= limit)
        rows.append({"name": name, "value": value, "limit": limit, "at_least": at_least, "met": bool(met),
                     "note": note})

    ceiling = res["latency"]["ceiling"]["examples_per_s"]
    cells = {(c["batch"], c["target"]): c for c in res["latency"]["cells"]}
    for kind, sec in res["servers"].items():
        if "skipped" in sec:
            continue
        by = {r["clients"]: r for r in sec["batch1"]}
        if kind == "embedded":
            add("embedded b1 16 clients / in-process pre-built b32 examples/s", by[16]["examples_per_s"] / ceiling,
                LIMITS["embedded_16_over_ceiling"], True, "aim 0.5")
            add("embedded b1 throughput 64 clients / 16 clients", by[64]["requests_per_s"] / by[16]["requests_per_s"],
                1.0, True)
        else:
            now, before = by[16]["requests_per_s"] / ceiling, TORCHSERVE_BEFORE_REQ_S / CEILING_BEFORE
            add("torchserve b1 16 clients / before issue 10, each as a share of its run's ceiling", now / before,
                LIMITS["torchserve_16_over_before"], True,
                f"{by[16]['requests_per_s']:.0f} req/s / {ceiling:,.0f} ex/s now, {TORCHSERVE_BEFORE_REQ_S} / "
                f"{CEILING_BEFORE:,.0f} before; {by[16]['requests_per_s'] / TORCHSERVE_BEFORE_REQ_S:.2f}x in raw req/s")
        add(f"{kind} p99 at 16 clients / Little's-law mean", by[16].get("p99_over_little"),
            LIMITS["p99_over_little"], False)
        capacity_stolen = sec.get("capacity_cpu_stolen")
        for share in PACED:
            loads = [p for p in sec["paced"] if p["budget"] == "user" and p["share_of_capacity"] == share]
            pct = int(round(share * 100))
            if pct in (50, 90):     # the median of the rounds
                stolen = [p.get("cpu_stolen") for p in loads]
                add(f"{kind} within budget at the client, {pct}% of capacity",
                    float(np.median([p["client_hit_rate"] for p in loads])) if loads else None,
                    LIMITS[f"budget_{pct}"], True, f"budget {sec['budget_ms']:.1f} ms; median of "
                    + ", ".join(f"{p['client_hit_rate']:.1%}" for p in loads)
                    + ("" if None in stolen or capacity_stolen is None else
                       "; CPU stolen " + ", ".join(f"{s:.0%}" for s in stolen)
                       + f" in these loads, {capacity_stolen:.0%} in the closed loop that set the capacity"))
            else:
                add(f"{kind} at {pct}% of capacity: calls neither answered nor refused clearly",
                    float(sum(p["lost"] + p["other_errors"] for p in loads)) if loads else None, 0.0, False,
                    "refused: DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED")
    for batch in (1, 32):
        add(f"in-process ensemble b{batch}: on the fly / pre-built", cells[batch, "ensemble"]["ratio"],
            LIMITS[f"ratio_batch{batch}"], False)
    return rows


# --- report -------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (kind, sec) in zip(("C0", "C1"), res["servers"].items()):
        if "skipped" in sec:
            continue
        c = [r["clients"] for r in sec["batch1"]]
        left.plot(c, [r["examples_per_s"] for r in sec["batch1"]], "o-", color=color, label=f"{kind}, batch 1")
        left.plot([r["clients"] for r in sec["batch32"]], [r["examples_per_s"] for r in sec["batch32"]], "s--",
                  color=color, label=f"{kind}, batch 32")
        right.plot(c, [r["client_latency"]["median_ms"] for r in sec["batch1"]], "o-", color=color,
                   label=f"{kind} p50")
        right.plot(c, [r["client_latency"]["p99_ms"] for r in sec["batch1"]], "x:", color=color, label=f"{kind} p99")
    left.axhline(res["latency"]["ceiling"]["examples_per_s"], color="k", lw=0.8,
                 label="in-process pre-built, batch 32")
    for ax, ylabel in ((left, "examples/s"), (right, "client latency, ms (batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    right.set_yscale("log")
    fig.suptitle(f"full ensemble, servers with default settings ({res['machine']['nproc']} CPUs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict) -> str:
    """The markdown figures block of docs/serving.md, from the JSON only."""
    m, lat, rb = res["machine"], res["latency"], res["resident"]
    stolen = [r["cpu_stolen"] for sec in res["servers"].values() if "skipped" not in sec
              for r in sec["batch1"] + sec["batch32"] + sec["paced"] if r.get("cpu_stolen") is not None]
    out = [f"Command: `{res['command']}`  ",
           f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, in-process device {m['device']}; "
           f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
           + (f"; CPU stolen by other guests during a server load: at most {max(stolen):.0%}" if stolen else "")
           + f"{' (--quick: smoke-test counts, not figures)' if res['quick'] else ''}.", "",
           "**Must show** (issue 10)", "", "| figure | value | limit | met |", "|---|---|---|---|"]
    for row in res["must_show"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3g}"
        out.append(f"| {row['name']}{' (' + row['note'] + ')' if row['note'] else ''} | {value} | "
                   f"{'>=' if row['at_least'] else '<='} {row['limit']:g} | {'yes' if row['met'] else 'no'} |")
    out += ["", f"**In-process latency** (ms, median of {lat['reps']} interleaved rounds; cache off; pre-built = "
            "plain PyTorch modules; engine frozen = the engine serving members frozen at load; pre-built traced = "
            "the plain modules as TorchScript traces, the engine's own technique)", "",
            "| batch | members | on the fly | pre-built | engine frozen | pre-built traced | on the fly / pre-built | "
            "on the fly / engine frozen | on the fly / pre-built traced | CPU ratio | generation ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in lat["cells"]:
        out.append(f"| {c['batch']} | {c['target']} | {c['on_the_fly']['median_ms']:.2f} | "
                   f"{c['prebuilt']['median_ms']:.2f} | {c['engine_frozen']['median_ms']:.2f} | "
                   f"{c['prebuilt_traced']['median_ms']:.2f} | {c['ratio']:.2f}x | "
                   f"{c['ratio_engine_frozen']:.2f}x | {c['ratio_prebuilt_traced']:.2f}x | {c['cpu_ratio']:.2f}x | "
                   f"{c['generation_ms_median']:.2f} |")
    out += ["", f"Ceiling: the in-process pre-built ensemble at batch 32 runs "
            f"{lat['ceiling']['examples_per_s']:,.0f} examples/s (the engine on the fly: "
            f"{lat['ceiling']['engine_on_the_fly_examples_per_s']:,.0f}).", "",
            "**Generation alone** (cache off; CPU time; aten ops dispatched)", "",
            "| call | weights | CPU median ms | aten ops | of which mm / copy | pre-built forward ops (batch 1) |",
            "|---|---|---|---|---|---|"]
    for name, g in res["generation"].items():
        by = g["ops_by_name"]
        out.append(f"| {name} | {g['weights']:,} | {g['cpu_ms_median']:.2f} | {g['ops']} | "
                   f"{by.get('mm', 0) + by.get('matmul', 0)} / {by.get('copy_', 0)} | {g['prebuilt_forward_ops_batch1']} |")
    out += ["", "**Resident bytes** (cache off)", "", "| bank | coefficients | norms + heads | resident total "
            "| members' unshared weights | target (unshared / N + norms + heads) | left after a batch | met |",
            "|---|---|---|---|---|---|---|---|",
            f"| {rb['bank']:,} | {rb['coefficients']:,} | {rb['norms_heads']:,} | {rb['resident_total']:,} | "
            f"{rb['unshared_total']:,} (N = {rb['members']}) | {rb['target']:,.0f} | "
            f"{rb['transient_weights_left_after_batch']} | {'yes' if rb['met'] else 'no'} |", "",
            f"**Servers, closed loop** (full ensemble, default settings, {res['config']['seconds']:g} s per load; "
            f"each row the median of {res['config']['rounds']} rounds by requests/s, every round's beside it)", "",
            "| server | batch | clients | requests/s | examples/s | p50 ms | p99 ms | Little's mean ms | errors "
            "| CPU stolen | requests/s, each round | CPU stolen, each round |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, sec in res["servers"].items():
        if "skipped" in sec:
            out.append(f"| {kind} | skipped: {sec['skipped']} | | | | | | | | | | |")
            continue
        for r in sec["batch1"] + sec["batch32"]:
            cl = r["client_latency"] or {"median_ms": float("nan"), "p99_ms": float("nan")}
            out.append(f"| {kind} | {r['batch']} | {r['clients']} | {r['requests_per_s']:.1f} | "
                       f"{r['examples_per_s']:.1f} | {cl['median_ms']:.2f} | {cl['p99_ms']:.2f} | "
                       f"{r.get('little_mean_ms', float('nan')):.2f} | {r['errors']} | {_share(r.get('cpu_stolen'))} | "
                       + ", ".join(f"{v:.0f}" for v in r["rounds_req_s"]) + " | "
                       + ", ".join(_share(v) for v in r["rounds_cpu_stolen"]) + " |")
    out += ["", "**Servers, calls past their deadline** (batch 1, 16 clients, closed loop, each call's "
            "`deadline_unix_ms` a minute before it was sent: what refusing a call nobody waits for costs)", "",
            "| server | calls | refused per s | answered | error codes | server CPU ms a call |", "|---|---|---|---|---|---|"]
    for kind, sec in res["servers"].items():
        if "expired" in sec:
            e = sec["expired"]
            cpu = "n/a" if e["server_cpu_ms_per_call"] is None else f"{e['server_cpu_ms_per_call']:.3f}"
            out.append(f"| {kind} | {e['calls']} | {e['requests_per_s']:.0f} | {e['answered']} | "
                       f"{', '.join(f'{k} {v}' for k, v in e['error_codes'].items())} | {cpu} |")
    out += ["", "**Servers, paced batch-1 load with a budget** (latency_budget_ms sent with the matching "
            f"deadline_unix_ms; `user`: one budget for both servers, {res['config']['budget_factor']:g} x the "
            f"slower server's 1-client p50; `own`: {res['config']['budget_factor']:g} x the server's own 1-client "
            "p50, where that is tighter; capacity = the server's best closed-loop batch-1 round, in requests/s; each share "
            f"below capacity {res['config']['rounds']} times in turn (round), the overload once, and must show takes "
            "the rounds' median within budget; device "
            "thread busy: its share of the load's time at work, and of that the share it had a CPU, "
            "from the server's `npas_device_*_seconds_total`: the rest it waited for a core or for the GIL; "
            "CPU stolen: the machine's CPU time its hypervisor gave other guests during the load, /proc/stat)", "",
            "| server | budget | share of capacity | round | paced requests/s | offered requests/s | budget ms | sent "
            "| answered | within budget at the client | refused | other errors | lost | members used (mean) "
            "| client p99 ms | device thread busy | of it on a CPU | CPU stolen |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, sec in res["servers"].items():
        if "skipped" in sec:
            continue
        for p in sorted(sec["paced"], key=lambda p: (p["budget"] != "user", p["share_of_capacity"], p["round"])):
            cl = p["client_latency"] or {"p99_ms": float("nan")}
            out.append(f"| {kind} | {p['budget']} | {p['share_of_capacity']:.0%} | {p['round'] + 1} | "
                       f"{p['rate_per_s']:.1f} | {p['offered_per_s']:.1f} | "
                       f"{p['budget_ms']:.2f} | "
                       f"{p['sent']} | {p['answered']} | {p['client_hit_rate']:.1%} | {p['refused']} | "
                       f"{p['other_errors']} | {p['lost']} | {p['members_used_mean']:.2f} | {cl['p99_ms']:.2f} | "
                       f"{_share(p.get('device_busy_share'))} | {_share(p.get('device_cpu_of_busy'))} | "
                       f"{_share(p.get('cpu_stolen'))} |")
    return "\n".join(out)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def update_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else f"{DOC_START}\n{DOC_END}\n"
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path} has no figures block ({DOC_START} ... {DOC_END})")
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    path.write_text(f"{head}{DOC_START}\n{block}\n{DOC_END}{tail}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    from npas_serve.engine import Engine, EngineConfig

    checkpoint = args.checkpoint.resolve()
    if not (checkpoint / "manifest.json").is_file():
        raise SystemExit(f"{checkpoint} is not a checkpoint; train one with `npas-serve train --out {args.checkpoint}`")
    command = " ".join([".venv/bin/python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    engine = Engine.load(checkpoint, EngineConfig(cache_bytes=0, device=args.device))   # default threads
    res = {"command": command, "checkpoint": str(checkpoint), "quick": args.quick, "machine": machine(args.device),
           "config": {"reps": args.reps, "seconds": args.seconds, "rounds": args.rounds,
                      "budget_factor": args.budget_factor,
                      "cache_bytes": 0, "clients_batch1": list(CLIENTS_B1), "clients_batch32": list(CLIENTS_B32),
                      "paced_shares": list(PACED)},
           "limits": LIMITS, "engine_load_s": time.perf_counter() - t0}
    frozen_engine = Engine.load(checkpoint, EngineConfig(cache_bytes=0, device=args.device, freeze=True))
    try:
        res["latency"] = latency_section(engine, frozen_engine, args.reps)
        res["resident"] = resident_section(engine)
        res["generation"] = generation_section(engine, max(args.reps, 5))
    finally:
        engine.close()
        frozen_engine.close()
    input_shape, members = engine.limits.input_shape, len(engine.names)
    del engine, frozen_engine    # free the cores' caches for the servers
    res["servers"] = servers(args, checkpoint, input_shape, members)
    res["must_show"] = must_show(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    plot(res, args.out.with_suffix(".png"))
    block = render(res)
    print(block)
    print(f"\nresults -> {args.out}, plot -> {args.out.with_suffix('.png')}")
    if args.update_doc:
        update_doc(args.update_doc, block)
        print(f"figures -> {args.update_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
