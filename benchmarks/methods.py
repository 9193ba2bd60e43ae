"""The NPAS methods head to head, and against efficient-ensemble baselines at equal stored parameters.

Protocol (docs/methods.md#the-benchmark): MNIST-1D, the `mnist1d-resnet-bench` family (two
blocks per stage, members of two depths), every run with the same recipe (AdamW 3e-3, weight
decay 1e-2, cosine, batch 128, EPOCHS epochs, 10% of the training examples held out as a seeded
validation split that fits the temperatures), SEEDS seeds. Shared-bank methods train through
`run_training` and are scored by `evaluate` (so searches, unsharing, validation and temperature
scaling run exactly as `npas-serve train` / `eval` run them); the baselines (`npas_serve.baselines`:
deep ensemble, Packed-Ensembles, BatchEnsemble, 3 estimators) are sized to the stored parameters
(bank + coefficients + norms and heads) of the shared-bank model at EQUAL_BUDGET and train with
the same loop settings. Claims are paired per-seed differences with 95% t-intervals; a claim
is made only when the interval excludes 0.

SuperWeights needs one template per (group, width): below that budget (0.314 of the largest
member here) it runs this project's pooled extension, labelled "pooled" in every table.

    OMP_NUM_THREADS=1 python benchmarks/methods.py --jobs 2 --resume   # full run (about 3 h on 2 cores)
    python benchmarks/methods.py --quick --out /tmp/q                   # smoke run (the test suite's)
    python benchmarks/methods.py --report                               # tables from methods.jsonl

Each finished run is appended to OUT/methods.jsonl, so an interrupted run keeps its results and
`--resume` skips them; the plateau curve (the unshared ensemble's members, validation accuracy
per epoch) goes to OUT/methods_curve.json. At the end: methods.json, methods.md, methods.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILY, DATA = "mnist1d-resnet-bench", "mnist1d"
EPOCHS = 40
SEEDS = (0, 1, 2, 3, 4)
BUDGETS = (0.1, 0.25, 0.5)
EQUAL_BUDGET = 0.25           # the baselines and single-budget methods sit at this budget's stored parameters
VALIDATION = 0.1
REFERENCE = "sw-gradient"     # the shared-bank model the baselines are sized to
ESTIMATORS = 3                # the baselines' estimators: as many as the family's members


@dataclass(frozen=True)
class Method:
    name: str
    generator: str = ""                       # a shared-bank method's generator; "" for a baseline
    grouping: str = "shape"
    kwargs: dict[str, Any] = field(default_factory=dict)
    budgets: tuple[float, ...] | None = BUDGETS   # None: budget-free (unshared, baselines at EQUAL_BUDGET)
    baseline: str = ""                        # a name in npas_serve.baselines.BASELINES


METHODS = [
    Method("sw-gradient", "superweights", "gradient"),
    Method("sw-shape", "superweights", "shape"),
    Method("ssn-kmeans", "ssn", "kmeans", {"down": "wavg", "up": "inter"}),
    Method("ssn-shape", "ssn", "shape", {"down": "wavg", "up": "inter"}),
    Method("sw-random", "superweights", "random", budgets=(EQUAL_BUDGET,)),
    Method("arbnet-dir-0.1", "arbnet", kwargs={"hash": "dirichlet", "alpha": 0.1}, budgets=(EQUAL_BUDGET,)),
    Method("arbnet-dir-10", "arbnet", kwargs={"hash": "dirichlet", "alpha": 10.0}, budgets=(EQUAL_BUDGET,)),
    Method("arbnet-nbh-2", "arbnet", kwargs={"hash": "neighborhood", "spread": 2.0}, budgets=(EQUAL_BUDGET,)),
    Method("arbnet-nbh-500", "arbnet", kwargs={"hash": "neighborhood", "spread": 500.0}, budgets=(EQUAL_BUDGET,)),
    Method("unshared", "superweights", "unshared", budgets=None),
    Method("deep-ensemble", budgets=None, baseline="deep-ensemble"),
    Method("packed-ensembles", budgets=None, baseline="packed-ensembles"),
    Method("batchensemble", budgets=None, baseline="batchensemble"),
]

# (question, method a, method b, budget or None); each is answered per budget where both ran
COMPARISONS = [
    ("gradient vs shape grouping (SuperWeights)", "sw-gradient", "sw-shape"),
    ("gradient vs random grouping (SuperWeights)", "sw-gradient", "sw-random"),
    ("SuperWeights vs SSN, searched groups", "sw-gradient", "ssn-kmeans"),
    ("SuperWeights vs SSN, shape groups", "sw-shape", "ssn-shape"),
    ("k-means vs shape groups (SSN)", "ssn-kmeans", "ssn-shape"),
    ("balanced vs unbalanced hashing (ArbNet, Dirichlet alpha 10 vs 0.1)", "arbnet-dir-10", "arbnet-dir-0.1"),
    ("deterministic neighbourhood vs scattered hashing (ArbNet spread 2 vs 500)", "arbnet-nbh-2",
     "arbnet-nbh-500"),
    ("shared bank vs independent deep ensemble, equal stored parameters", "sw-gradient", "deep-ensemble"),
    ("shared bank vs Packed-Ensembles, equal stored parameters", "sw-gradient", "packed-ensembles"),
    ("shared bank vs BatchEnsemble, equal stored parameters", "sw-gradient", "batchensemble"),
    ("shared bank vs the unshared ensemble (all members' parameters)", "sw-gradient", "unshared"),
]
HIGHER_IS_BETTER = {"ensemble_acc": True, "ensemble_nll": False, "ensemble_ece": False}


# --- one run --------------------------------------------------------------------------------------------

def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (method, budget, seed); runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    started, cpu = time.perf_counter(), time.process_time()
    scored = _run_baseline(job) if job["baseline"] else _run_family(job)
    # CPU seconds are what the run costs: wall time also counts other work on a shared machine
    return {"label": job["label"], "budget": job["budget"], "seed": job["seed"], **scored,
            "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def _dataset(job: dict[str, Any]):
    from npas_serve.data import load_dataset

    return load_dataset(job["data"], num_classes=10).with_channels(1)


def _run_family(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from npas_serve.evaluate import evaluate
    from npas_serve.family import FamilySpec, build_family
    from npas_serve.train import TrainConfig, run_training

    budget, budget_params = job["budget"], None
    if budget is None:     # unshared: a bank exactly the size of all members together
        probe = build_family(FamilySpec(family=FAMILY, family_kwargs={"num_classes": 10, "in_channels": 1}))
        budget_params = sum(probe.member_shared_numel())
    spec = FamilySpec(family=FAMILY, generator=job["generator"], generator_kwargs=dict(job["kwargs"]),
                      budget=budget, budget_params=budget_params, grouping=job["grouping"], seed=job["seed"])
    cfg = TrainConfig(epochs=job["epochs"], seed=job["seed"], search_epochs=job["search_epochs"],
                      validation=VALIDATION)
    with tempfile.TemporaryDirectory() as tmp:
        family, manifest = run_training(spec, cfg, Path(tmp) / "run", data=job["data"], progress=False)
        losses = json.loads((Path(tmp) / "run" / "train_state.json").read_text())["losses"]
    # per member and unit exit weight, comparable with a baseline's per-estimator loss
    losses = [loss / (len(family.names) * sum(cfg.exit_weights_for(family.num_exits))) for loss in losses]
    report = evaluate(family, manifest, _dataset(job))
    last = max(e.exit for e in report.exits)
    finals = [e for e in report.exits if e.exit == last]
    full = report.ensembles[-1]
    x = torch.randn(32, 1, 40)
    with torch.inference_mode():
        latency = {f"latency_b{b}_ms": _latency_ms(lambda: family(x[:b])) for b in (1, 32)}
    search = manifest.search or {}
    return {"member_acc": statistics.mean(e.accuracy for e in finals), "min_member_acc": min(e.accuracy for e in finals),
            "ensemble_acc": full.accuracy, "ensemble_nll": full.nll, "ensemble_ece": full.ece,
            "ensemble_nll_before": full.nll_before, "ensemble_ece_before": full.ece_before,
            "temperature": full.temperature, "stored_params": report.params.resident, "bank": report.params.bank,
            "pooled": bool(report.diagnostics.get("pooled", False)), "groups": len(set(manifest.spec.groups)),
            "final_losses": losses[-3:], "search": _search_summary(search), **latency}


def _search_summary(search: dict[str, Any]) -> dict[str, Any]:
    """The search's figures worth a table: cosines, merges, K per bank, ARI."""
    out = {}
    if "lead_cosines" in search:
        out.update(lead_cos_mean_abs=search["lead_cosines"]["mean_abs"], merges=len(search["merges"]),
                   threshold=search["threshold"], joins_by_gradient=sum(1 for j in search["joins"]
                                                                        if j[2] != "position"),
                   templates_per_bank=search["templates_per_bank"])
    if "unshare" in search:
        out.update(rows_before=search["unshare"]["rows_before"], rows_after=search["unshare"]["rows_after"],
                   banks_skipped_one_template=len(search["unshare"]["banks_skipped_one_template"]))
    if "ari_against_initial_embeddings" in search:
        out.update(ari=search["ari_against_initial_embeddings"],
                   embedding_cos_to_initial=search["embedding_cosine_to_initial"]["mean"])
    return out


def _run_baseline(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from npas_serve.baselines import parameter_count, sized
    from npas_serve.data import ValidationSplit
    from npas_serve.ensemble import calibrate, combine, fit_temperature
    from npas_serve.evaluate import scores
    from npas_serve.train import TrainConfig
    from npas_serve.train.loop import deterministic, fit_epochs, make_optimizer

    dataset = _dataset(job)
    split = ValidationSplit.of_data(dataset, VALIDATION, job["seed"])
    train, xv, yv = split.apply(dataset)
    norm = train.normalisation()
    x, y = torch.from_numpy(norm.apply(train.x_train)), torch.from_numpy(train.y_train)
    cfg = TrainConfig(epochs=job["epochs"], seed=job["seed"])
    model = sized(job["baseline"], job["params"], seed=job["seed"], estimators=ESTIMATORS)

    def loss_of(xb, yb):                                # the sum of the estimators' losses
        return sum(torch.nn.functional.cross_entropy(z, yb) for z in model(xb))     # model: (estimators, B, classes)

    with deterministic():
        torch.manual_seed(cfg.seed)
        losses = fit_epochs(model, loss_of, make_optimizer(model, cfg), x, y, cfg, progress=False)
    losses = [loss / ESTIMATORS for loss in losses]     # per estimator
    model.eval()
    with torch.inference_mode():
        def probs(inputs):
            return model(torch.from_numpy(norm.apply(inputs))).softmax(-1)

        held, test = probs(xv), probs(dataset.x_test)
        yt, yv = torch.from_numpy(dataset.y_test), torch.from_numpy(yv)
        t = fit_temperature(combine(list(held)).probabilities, yv)
        before = scores(combine(list(test)).probabilities, yt)
        after = scores(calibrate(combine(list(test)).probabilities, t), yt)
        members = [scores(p, yt).accuracy for p in test]
        xb = torch.randn(32, 1, 40)
        latency = {f"latency_b{b}_ms": _latency_ms(lambda: model(xb[:b])) for b in (1, 32)}
    return {"member_acc": statistics.mean(members), "min_member_acc": min(members),
            "ensemble_acc": after.accuracy, "ensemble_nll": after.nll, "ensemble_ece": after.ece,
            "ensemble_nll_before": before.nll, "ensemble_ece_before": before.ece, "temperature": t,
            "stored_params": parameter_count(model), "bank": parameter_count(model), "pooled": False,
            "groups": 0, "final_losses": losses[-3:], "search": {}, **latency}


def _latency_ms(fn, repeats: int = 15) -> float:
    """Median milliseconds of one call, after three warm-up calls (one thread)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def reference_params(budget: float) -> int:
    """Stored parameters of the shared-bank family at `budget` (bank, coefficients, norms, heads),
    as built with shape groups: what the baselines are sized to."""
    from npas_serve.evaluate import param_count
    from npas_serve.family import FamilySpec, build_family

    family = build_family(FamilySpec(family=FAMILY, family_kwargs={"num_classes": 10, "in_channels": 1},
                                     budget=budget))
    return param_count(family).resident


def family_facts() -> dict[str, Any]:
    """The benchmark family's sizes, for the page that reports the benchmark."""
    from npas_serve.family import FamilySpec, build_family
    from npas_serve.generators.superweights import bank_layout

    family = build_family(FamilySpec(family=FAMILY, family_kwargs={"num_classes": 10, "in_channels": 1}))
    shared = family.member_shared_numel()
    return {"members": {n: {"shared_params": p, "shared_layers": sum(1 for s in family.slots if s.member == m)}
                        for m, (n, p) in enumerate(zip(family.names, shared))},
            "all_members_shared_params": sum(shared),
            "one_template_per_group_width": sum(b.size for b in bank_layout(family.slots, family.generator.groups)[0])
            / max(shared),
            "stored_params_at_budget": {str(b): reference_params(b) for b in BUDGETS}}


def jobs_for(seeds, budgets, epochs: int, data: str, search_epochs: int | None) -> list[dict[str, Any]]:
    """Seed-major order: a cut-short run still has every method at the first seeds."""
    params = reference_params(EQUAL_BUDGET if EQUAL_BUDGET in budgets else budgets[0])
    jobs = []
    for seed in seeds:
        for m in METHODS:
            cells = [None] if m.budgets is None else [b for b in m.budgets if b in budgets] or [budgets[0]]
            for budget in cells:
                jobs.append({"label": m.name, "generator": m.generator, "grouping": m.grouping, "kwargs": m.kwargs,
                             "baseline": m.baseline, "params": params, "budget": budget, "seed": seed,
                             "epochs": epochs, "search_epochs": search_epochs, "data": data})
    return jobs


def key(r: dict[str, Any]) -> tuple:
    return (r["label"], r["budget"], r["seed"])


# --- the plateau curve ------------------------------------------------------------------------------------

def curve(epochs: int, data: str, seed: int = 0) -> dict[str, Any]:
    """Validation accuracy of every member of the unshared ensemble after each epoch of the recipe's
    schedule: where it flattens is where the protocol's epochs should end."""
    import torch

    from npas_serve.data import ValidationSplit
    from npas_serve.evaluate import exit_probs
    from npas_serve.family import FamilySpec, build_family
    from npas_serve.train import TrainConfig
    from npas_serve.train.loop import make_optimizer, train_epochs

    torch.set_num_threads(1)
    dataset = _dataset({"data": data})
    train, xv, yv = ValidationSplit.of_data(dataset, VALIDATION, seed).apply(dataset)
    norm = train.normalisation()
    x, y = torch.from_numpy(norm.apply(train.x_train)), torch.from_numpy(train.y_train)
    xv, yv = torch.from_numpy(norm.apply(xv)), torch.from_numpy(yv)
    probe = build_family(FamilySpec(family=FAMILY, family_kwargs={"num_classes": 10, "in_channels": 1}))
    family = build_family(FamilySpec(family=FAMILY, family_kwargs={"num_classes": 10, "in_channels": 1},
                                     grouping="unshared", budget_params=sum(probe.member_shared_numel()), seed=seed))
    cfg = TrainConfig(epochs=epochs, seed=seed)
    opt = make_optimizer(family, cfg)
    torch.manual_seed(seed)
    points = []
    for epoch in range(epochs):
        loss = train_epochs(family, family, opt, x, y, cfg, epoch, progress=False, end_epoch=epoch + 1)[0]
        probs = exit_probs(family, xv)[:, -1]
        points.append({"epoch": epoch + 1, "train_loss": loss,
                       "val_acc": {n: float((probs[m].argmax(-1) == yv).float().mean())
                                   for m, n in enumerate(family.names)}})
    return {"seed": seed, "epochs": epochs, "family": FAMILY, "grouping": "unshared", "points": points}


# --- summary ----------------------------------------------------------------------------------------------

METRICS = ("member_acc", "min_member_acc", "ensemble_acc", "ensemble_nll", "ensemble_ece", "ensemble_ece_before",
           "latency_b1_ms", "latency_b32_ms")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every (method, budget)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["label"], r["budget"]), []).append(r)
    order = {m.name: i for i, m in enumerate(METHODS)}
    rows = []
    for (label, budget), rs in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1] or 0)):
        row = {"method": label, "budget": budget, "seeds": len(rs), "pooled": any(r["pooled"] for r in rs),
               "stored_params": round(statistics.mean(r["stored_params"] for r in rs)),
               "final_loss": statistics.mean(r["final_losses"][-1] for r in rs)}
        for metric in METRICS:
            values = [r[metric] for r in rs if r.get(metric) is not None]
            row[metric] = statistics.mean(values) if values else None
            row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        searches = [r["search"] for r in rs if r["search"]]
        numbers = [k for k, v in (searches[0].items() if searches else []) if isinstance(v, (int, float))]
        row["search"] = {k: statistics.mean(s[k] for s in searches) for k in numbers}
        rows.append(row)
    return rows


def paired(results: list[dict[str, Any]], a: str, b: str, budget_a, budget_b, metric: str) -> dict[str, Any] | None:
    """Mean of the per-seed differences a - b with its 95% t-interval, over the seeds both ran."""
    from scipy import stats

    va = {r["seed"]: r[metric] for r in results if r["label"] == a and r["budget"] == budget_a}
    vb = {r["seed"]: r[metric] for r in results if r["label"] == b and r["budget"] == budget_b}
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    diffs = [va[s] - vb[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = (stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            if len(diffs) > 1 else math.inf)
    if abs(mean) <= half or not math.isfinite(half):
        verdict = "no claim (interval includes 0)" if math.isfinite(half) else "no claim (one seed)"
    else:
        better = (mean > 0) == HIGHER_IS_BETTER[metric]
        verdict = f"{a if better else b} better"
    return {"metric": metric, "seeds": len(seeds), "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half,
            "verdict": verdict}


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    budgets = {m.name: m.budgets for m in METHODS}
    ran = {(r["label"], r["budget"]) for r in results}
    out = []
    for question, a, b in COMPARISONS:
        for budget in sorted({r["budget"] for r in results if r["label"] == a and r["budget"] is not None}
                             or {None}, key=lambda v: v or 0):
            budget_b = budget if budgets[b] is not None else None
            if (a, budget) not in ran or (b, budget_b) not in ran:
                continue
            if budgets[b] is None and b != "unshared" and budget != EQUAL_BUDGET:
                continue     # the baselines are sized to EQUAL_BUDGET's stored parameters only
            for metric in HIGHER_IS_BETTER:
                found = paired(results, a, b, budget, budget_b, metric)
                if found:
                    out.append({"question": question, "a": a, "b": b, "budget": budget, **found})
    return out


def markdown(rows: list[dict[str, Any]], compared: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def budget_text(r):
        if r["budget"] is None:
            return "all members" if r["method"] == "unshared" else f"= {100 * EQUAL_BUDGET:g}% stored"
        return f"{100 * r['budget']:g}%" + (" (pooled)" if r["pooled"] else "")

    pm = lambda v, s, scale=100, fmt=".1f": f"{scale * v:{fmt}} ± {scale * s:{fmt}}"   # noqa: E731
    lines = [f"Command: `{meta['command']}`; epochs {meta['epochs']}, seeds {meta['seeds']}, "
             f"runs {meta['runs']}.", "",
             "| method | budget | stored params | member acc % | worst member % | ensemble acc % | ensemble NLL | "
             "ECE (before T) | final train loss per member | seeds | search |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["search"]
        search = ", ".join(f"{k} {v:.3g}" for k, v in s.items() if k in (
            "lead_cos_mean_abs", "merges", "joins_by_gradient", "rows_after", "ari", "embedding_cos_to_initial"))
        lines.append(f"| {r['method']} | {budget_text(r)} | {r['stored_params']:,} | "
                     f"{pm(r['member_acc'], r['member_acc_std'])} | {100 * r['min_member_acc']:.1f} | "
                     f"{pm(r['ensemble_acc'], r['ensemble_acc_std'])} | "
                     f"{pm(r['ensemble_nll'], r['ensemble_nll_std'], 1, '.3f')} | "
                     f"{r['ensemble_ece']:.3f} ({r['ensemble_ece_before']:.3f}) | {r['final_loss']:.3f} | "
                     f"{r['seeds']} | {search} |")
    lines += ["", "Latency of the whole ensemble (all members, one thread, forward only; a shared bank "
              "generates its weights inside the forward):", "",
              "| method | budget | batch 1 ms | batch 32 ms |", "|---|---|---:|---:|"]
    for r in rows:
        if r["budget"] in (None, EQUAL_BUDGET):
            lines.append(f"| {r['method']} | {budget_text(r)} | {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} |")
    lines += ["", "Paired per-seed differences (a - b), mean and 95% t-interval:", "",
              "| question | budget | metric | a - b | 95% interval | seeds | verdict |", "|---|---|---|---:|---|---:|---|"]
    for c in compared:
        scale = 100 if c["metric"] == "ensemble_acc" else 1
        unit = " pts" if scale == 100 else ""
        budget = "-" if c["budget"] is None else f"{100 * c['budget']:g}%"
        lines.append(f"| {c['question']} | {budget} | {c['metric']} | {scale * c['mean_diff']:+.3f}{unit} | "
                     f"[{scale * c['ci_low']:+.3f}, {scale * c['ci_high']:+.3f}] | {c['seeds']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


DOC_START, DOC_END = "<!-- methods:start (benchmarks/methods.py --update-doc) -->", "<!-- methods:end -->"
PLACED = ["sw-gradient", "deep-ensemble", "packed-ensembles", "batchensemble", "unshared"]


def doc_block(rows: list[dict[str, Any]], compared: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """docs/methods.md's figures: each question's paired differences, one row per budget, and the
    shared bank placed against the efficient ensembles at equal stored parameters."""
    seeds = max((c["seeds"] for c in compared), default=0)
    out = [f"Command: `{meta['command']}`; {meta['runs']} runs, {meta['epochs']} epochs, up to {seeds} seeds "
           f"per cell. Each cell: mean of the per-seed differences a - b, with its 95% t-interval; a verdict "
           f"only where the interval excludes 0.", "",
           "| question (a vs b) | budget | seeds | ensemble accuracy, points | ensemble NLL | ensemble ECE | verdict |",
           "|---|---|---:|---|---|---|---|"]
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    for c in compared:
        cells.setdefault((c["question"], c["a"], c["b"], c["budget"]), {})[c["metric"]] = c
    for (question, a, b, budget), by in cells.items():
        def cell(metric: str, scale: float = 1.0, fmt: str = "+.3f") -> str:
            c = by[metric]
            return f"{scale * c['mean_diff']:{fmt}} [{scale * c['ci_low']:{fmt}}, {scale * c['ci_high']:{fmt}}]"
        verdicts = {m: by[m]["verdict"] for m in HIGHER_IS_BETTER}
        claims = [f"{v.removesuffix(' better')} on {m.removeprefix('ensemble_')}" for m, v in verdicts.items()
                  if not v.startswith("no claim")]
        budget_text = "-" if budget is None else f"{100 * budget:g}%" + (
            " (pooled)" if any(r["pooled"] for r in rows if r["method"] == a and r["budget"] == budget) else "")
        out.append(f"| {question} (`{a}` vs `{b}`) | {budget_text} | {by['ensemble_acc']['seeds']} | "
                   f"{cell('ensemble_acc', 100, '+.2f')} | {cell('ensemble_nll')} | {cell('ensemble_ece')} | "
                   f"{'; '.join(claims) or 'no claim'} |")
    out += ["", f"At equal stored parameters ({100 * EQUAL_BUDGET:g}% budget; mean ± standard deviation over seeds; "
            "ECE after temperature scaling, before it in brackets; latency of the whole ensemble's eager forward "
            "on one thread, mean over the runs, each measured beside another training run):", "",
            "| model | stored params | member acc % | ensemble acc % | ensemble NLL | ECE | batch 1 ms | batch 32 ms | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in PLACED:
        for r in rows:
            if r["method"] == name and r["budget"] in (None, EQUAL_BUDGET):
                out.append(f"| {name} | {r['stored_params']:,} | {100 * r['member_acc']:.1f} | "
                           f"{100 * r['ensemble_acc']:.1f} ± {100 * r['ensemble_acc_std']:.1f} | "
                           f"{r['ensemble_nll']:.3f} ± {r['ensemble_nll_std']:.3f} | {r['ensemble_ece']:.3f} "
                           f"({r['ensemble_ece_before']:.3f}) | {r['latency_b1_ms']:.1f} | {r['latency_b32_ms']:.1f} | "
                           f"{r['seeds']} |")
    out += ["", f"Wall time: {meta['run_wall_s_total'] / 3600:.1f} h summed over the runs "
            f"({meta['run_cpu_s_total'] / 3600:.1f} h of CPU over the {meta['runs_with_cpu_s']} runs that record it)."]
    return "\n".join(out)


def update_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path} has no {DOC_START} ... {DOC_END} markers to write between")
    head, rest = text.split(DOC_START, 1)
    path.write_text(head + DOC_START + "\n" + block + "\n" + DOC_END + rest.split(DOC_END, 1)[1])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in METHODS:
        pts = sorted((r["budget"], r["ensemble_nll"], r["ensemble_nll_std"]) for r in rows
                     if r["method"] == m.name and r["budget"] is not None)
        if pts:
            ax.errorbar([100 * p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o", ms=3,
                        capsize=2, label=m.name, ls="-" if m.generator == "superweights" else "--")
        for r in rows:
            if r["method"] == m.name and r["budget"] is None:
                ax.axhline(r["ensemble_nll"], lw=1, ls=":", color=f"C{len(ax.lines) % 10}", label=m.name)
    ax.set(xscale="log", xlabel="budget (% of the largest member's shared parameters)",
           ylabel="ensemble test NLL (calibrated), mean over seeds", title=f"{DATA} ({FAMILY})")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict[str, Any]], out: Path, meta: dict[str, Any],
                  doc: Path | None = None) -> list[dict[str, Any]]:
    rows = summarise(results)
    compared = comparisons(results)
    curve_path = out / "methods_curve.json"
    meta = {**meta, "runs": len(results), "run_wall_s_total": round(sum(r["wall_s"] for r in results), 1),
            "run_cpu_s_total": round(sum(r.get("cpu_s", 0.0) for r in results), 1),
            "runs_with_cpu_s": sum("cpu_s" in r for r in results),
            "family_facts": family_facts()}
    payload = {"meta": meta, "summary": rows, "comparisons": compared, "runs": results,
               "curve": json.loads(curve_path.read_text()) if curve_path.exists() else None}
    (out / "methods.json").write_text(json.dumps(payload, indent=1))
    (out / "methods.md").write_text(markdown(rows, compared, meta))
    plot(rows, out / "methods.png")
    if doc is not None:
        update_doc(doc, doc_block(rows, compared, meta))
    return rows


# --- driver -------------------------------------------------------------------------------------------

def quick_data(tmp: Path) -> str:
    """A small subset (400 train / 200 test) written as .npz, so a smoke run takes seconds per method."""
    import numpy as np

    from npas_serve.data import load_dataset

    d = load_dataset(DATA)
    path = tmp / f"{DATA}-quick.npz"
    np.savez(path, x=d.x_train[:400], y=d.y_train[:400], x_test=d.x_test[:200], y_test=d.y_test[:200])
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a data subset, 1 epoch, budget 25%%, one seed, a 1-epoch curve")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=[m.name for m in METHODS])
    parser.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} (quick: 1)")
    parser.add_argument("--no-curve", action="store_true", help="skip the plateau curve")
    parser.add_argument("--curve-only", action="store_true", help="only the plateau curve")
    parser.add_argument("--resume", action="store_true", help="skip runs already in OUT/methods.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite methods.json/.md/.png from the runs in OUT/methods.jsonl")
    parser.add_argument("--update-doc", type=Path, default=None, metavar="DOC",
                        help="also write the paired comparisons and the equal-parameters table into DOC "
                             "(docs/methods.md) between its methods:start/end markers")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "methods.jsonl"
    command = " ".join(["python", "benchmarks/methods.py", *(sys.argv[1:] if argv is None else argv)])
    epochs = args.epochs or (1 if args.quick else EPOCHS)
    seeds = tuple(args.seeds or ((0,) if args.quick else SEEDS))
    budgets = tuple(args.budgets or ((EQUAL_BUDGET,) if args.quick else BUDGETS))
    meta = {"command": command, "family": FAMILY, "data": DATA, "epochs": epochs, "seeds": list(seeds),
            "budgets": list(budgets), "equal_budget": EQUAL_BUDGET, "validation": VALIDATION, "jobs": args.jobs,
            "quick": args.quick}
    if args.report:
        write_outputs([json.loads(line) for line in log.read_text().splitlines()], args.out, meta, args.update_doc)
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = quick_data(Path(tmp)) if args.quick else DATA
        if not args.no_curve and not (args.resume and (args.out / "methods_curve.json").exists()):
            (args.out / "methods_curve.json").write_text(json.dumps(curve(epochs, data), indent=1))
        if args.curve_only:
            return 0
        jobs = jobs_for(seeds, budgets, epochs, data, 1 if args.quick else None)
        if args.methods:
            jobs = [j for j in jobs if j["label"] in args.methods]
        done = [json.loads(line) for line in log.read_text().splitlines()] if args.resume and log.exists() else []
        if not args.resume:
            log.write_text("")
        seen = {key(r) for r in done}
        todo = [j for j in jobs if key(j) not in seen]
        print(f"{len(todo)} runs ({len(jobs) - len(todo)} already done), {args.jobs} worker(s)", file=sys.stderr)
        results = list(done)
        if args.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for r in pool.imap_unordered(run_one, todo):
                    results.append(r)
                    _log(log, r, len(results), len(done) + len(todo), started)
        else:
            for job in todo:
                results.append(run_one(job))
                _log(log, results[-1], len(results), len(done) + len(todo), started)
        meta["wall_s_this_invocation"] = round(time.time() - started, 1)
        write_outputs(results, args.out, meta, args.update_doc)
    print(f"wrote {args.out}/methods.json, methods.md, methods.png in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def _log(log: Path, r: dict[str, Any], n: int, total: int, started: float) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"[{n}/{total} {time.time() - started:5.0f}s] {r['label']} budget={r['budget']} seed={r['seed']}: "
          f"ensemble acc {100 * r['ensemble_acc']:.1f}% nll {r['ensemble_nll']:.3f} ({r['wall_s']:.0f} s)",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
