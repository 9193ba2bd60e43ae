"""The three NPAS methods side by side: same families, budgets, epochs and seeds.

For each dataset (MNIST-1D with `mnist1d-resnet-tiny`, digits with
`digits-cnn-tiny`), each budget (a fraction of the largest member's shared
parameters) and each seed, every method trains through `run_training` (so
searched groupings and coefficient unsharing run exactly as `npas-serve train`
runs them) and is scored by `evaluate`: the members' final exits (mean over
members) and the ensemble of all members (mean softmax), accuracy and NLL.

"unshared" is an independent deep ensemble: the `unshared` grouping gives every
layer its own SuperWeights bank of exactly its size (one template times a
learned scalar, a reparametrised plain weight), with a budget of all members'
sizes, so no parameter is shared; the members train in one loop on the same
minibatches but their parameters never meet. It does not depend on the budget.

    OMP_NUM_THREADS=1 python benchmarks/methods.py --jobs 2            # full: see docs/methods.md
    python benchmarks/methods.py --quick --out /tmp/q                  # smoke run (the test suite's)

Each finished run is appended to `--out`/methods.jsonl, so an interrupted run
keeps its results and `--resume` skips them; at the end the summary
(methods.json), a markdown table (methods.md) and a plot (methods.png) are written.
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

DATASETS = {"mnist1d": "mnist1d-resnet-tiny", "digits": "digits-cnn-tiny"}
EPOCHS = {"mnist1d": 6, "digits": 10}
SEARCH_EPOCHS = 1            # warm-up of the searched groupings (gradient, kmeans) at these short schedules
BUDGETS = (0.05, 0.10, 0.25, 1.0)
SEEDS = (0, 1, 2)
SPREAD_SMALL, SPREAD_LARGE = 2.0, 500.0     # Neighborhood hash spread, in table entries


@dataclass(frozen=True)
class Method:
    name: str
    generator: str
    grouping: str = "shape"
    kwargs: dict[str, Any] = field(default_factory=dict)
    budget_free: bool = False     # trained once per seed, not per budget


METHODS = [
    Method("sw-gradient", "superweights", "gradient"),
    Method("sw-shape", "superweights", "shape"),
    Method("sw-random", "superweights", "random"),
    Method("ssn", "ssn", "kmeans", {"down": "wavg", "up": "inter"}),
    *[Method(f"arbnet-dir-{a:g}", "arbnet", "shape", {"hash": "dirichlet", "alpha": a}) for a in (0.1, 1.0, 10.0)],
    *[Method(f"arbnet-nbh-{s:g}", "arbnet", "shape", {"hash": "neighborhood", "spread": s})
      for s in (0.0, SPREAD_SMALL, SPREAD_LARGE)],
    Method("unshared", "superweights", "unshared", budget_free=True),
]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (dataset, method, budget, seed); runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from npas_serve.data import load_dataset
    from npas_serve.evaluate import evaluate
    from npas_serve.family import FamilySpec, build_family
    from npas_serve.train import TrainConfig, run_training

    family_name = DATASETS[job["dataset"]]
    budget, budget_params = job["budget"], None
    if budget is None:     # unshared: a bank exactly the size of all members together
        probe = build_family(FamilySpec(family=family_name, family_kwargs={"num_classes": 10, "in_channels": 1}))
        budget_params = sum(probe.member_shared_numel())
    spec = FamilySpec(family=family_name, generator=job["generator"], generator_kwargs=dict(job["kwargs"]),
                      budget=budget, budget_params=budget_params, grouping=job["grouping"], seed=job["seed"])
    cfg = TrainConfig(epochs=job["epochs"], seed=job["seed"], search_epochs=job.get("search_epochs"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        family, manifest = run_training(spec, cfg, Path(tmp) / "run", data=job["data"], progress=False)
    train_s = time.perf_counter() - started
    from npas_serve.registry import meta

    dataset = load_dataset(job["data"], num_classes=10).with_channels(meta("family", family_name)["input_ndim"])
    report = evaluate(family, manifest, dataset)
    last = max(e.exit for e in report.exits)
    finals = [e for e in report.exits if e.exit == last]
    full = report.ensembles[-1]
    p = report.params
    return {**{k: job[k] for k in ("dataset", "label", "seed")}, "budget": job["budget"],
            "member_acc": statistics.mean(e.accuracy for e in finals),
            "member_nll": statistics.mean(e.nll for e in finals),
            "best_member_acc": max(e.accuracy for e in finals),
            "ensemble_acc": full.accuracy, "ensemble_nll": full.nll, "ensemble_ece": full.ece,
            "bank": p.bank, "coefficients": p.coefficients, "private": sum(p.private.values()),
            "unshared_total": p.unshared_total, "groups": len(set(manifest.spec.groups)),
            "diagnostics": report.diagnostics, "train_s": round(train_s, 1)}


def jobs_for(datasets, budgets, seeds, epochs: dict[str, int], data: dict[str, str],
             search_epochs: int | None) -> list[dict[str, Any]]:
    """Seed-major order: a cut-short run still has every method at the first seeds."""
    jobs = []
    for seed in seeds:
        for dataset in datasets:
            for m in METHODS:
                for budget in ([None] if m.budget_free else budgets):
                    jobs.append({"dataset": dataset, "data": data[dataset], "label": m.name, "generator": m.generator,
                                 "grouping": m.grouping, "kwargs": m.kwargs, "budget": budget, "seed": seed,
                                 "epochs": epochs[dataset], "search_epochs": search_epochs})
    return jobs


def key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], r["label"], r["budget"], r["seed"])


# --- summary -------------------------------------------------------------------------------------------

METRICS = ("member_acc", "member_nll", "ensemble_acc", "ensemble_nll")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every (dataset, method, budget)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["dataset"], r["label"], r["budget"]), []).append(r)
    rows = []
    order = {m.name: i for i, m in enumerate(METHODS)}
    for (dataset, label, budget), rs in sorted(cells.items(), key=lambda kv: (
            kv[0][0], math.inf if kv[0][2] is None else kv[0][2], order.get(kv[0][1], 99))):
        row = {"dataset": dataset, "method": label, "budget": budget, "seeds": len(rs),
               "bank": round(statistics.mean(r["bank"] for r in rs)),
               "resident": round(statistics.mean(r["bank"] + r["coefficients"] + r["private"] for r in rs)),
               "unshared_total": rs[0]["unshared_total"],
               "groups": statistics.mean(r["groups"] for r in rs),
               "train_s": statistics.mean(r["train_s"] for r in rs)}
        for metric in METRICS:
            values = [r[metric] for r in rs]
            row[metric] = statistics.mean(values)
            row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        diags = [r["diagnostics"] for r in rs if r["diagnostics"]]
        if diags:
            row["diagnostics"] = {k: statistics.mean(d[k] for d in diags) for k in diags[0]}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"### {dataset} ({DATASETS[dataset]})", "",
                  "| budget | method | bank params | all params | member acc % | member NLL | ensemble acc % "
                  "| ensemble NLL | seeds | extra |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r["dataset"] == dataset):
            budget = "all members" if r["budget"] is None else f"{100 * r['budget']:g}%"
            d = r.get("diagnostics", {})
            extra = (f"load entropy {d['bucket_balance']:.3f} of max" if "bucket_balance" in d
                     else f"{r['groups']:.1f} groups" if r["method"].startswith(("sw", "ssn")) else "")
            lines.append(
                f"| {budget} | {r['method']} | {r['bank']:,} | {r['resident']:,} | {100 * r['member_acc']:.1f} ± "
                f"{100 * r['member_acc_std']:.1f} | {r['member_nll']:.3f} ± {r['member_nll_std']:.3f} | "
                f"{100 * r['ensemble_acc']:.1f} ± {100 * r['ensemble_acc_std']:.1f} | "
                f"{r['ensemble_nll']:.3f} ± {r['ensemble_nll_std']:.3f} | {r['seeds']} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for m in METHODS:
            pts = sorted((r["budget"], r["ensemble_nll"], r["ensemble_nll_std"]) for r in mine
                         if r["method"] == m.name and r["budget"] is not None)
            if pts:
                ax.errorbar([100 * p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                            marker="o", ms=3, capsize=2, label=m.name,
                            ls="-" if m.generator == "superweights" else "--" if m.generator == "ssn" else ":")
            free = [r for r in mine if r["method"] == m.name and r["budget"] is None]
            if free:
                ax.axhline(free[0]["ensemble_nll"], color="k", lw=1, label=f"{m.name} (all members' size)")
        ax.set(xscale="log", yscale="log", xlabel="budget (% of the largest member's shared params)",
               ylabel="ensemble test NLL (mean over seeds)", title=f"{dataset} ({DATASETS[dataset]})")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = summarise(results)
    (out / "methods.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    (out / "methods.md").write_text(markdown(rows))
    plot(rows, out / "methods.png")
    return rows


# --- driver -------------------------------------------------------------------------------------------

def quick_data(tmp: Path) -> dict[str, str]:
    """Small subsets (600 train / 300 test) written as .npz, so a smoke run takes seconds per method."""
    import numpy as np

    from npas_serve.data import load_dataset

    paths = {}
    for name in DATASETS:
        d = load_dataset(name)
        path = tmp / f"{name}-quick.npz"
        np.savez(path, x=d.x_train[:600], y=d.y_train[:600], x_test=d.x_test[:300], y_test=d.y_test[:300])
        paths[name] = str(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: data subsets, 1 epoch, budget 25%%, one seed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--resume", action="store_true", help="skip runs already in OUT/methods.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite methods.json/.md/.png from the runs in OUT/methods.jsonl")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "methods.jsonl"
    if args.report:
        results = [json.loads(line) for line in log.read_text().splitlines()]
        write_outputs(results, args.out, {"command": "python benchmarks/methods.py " + " ".join(argv or sys.argv[1:]),
                                          "epochs": EPOCHS, "search_epochs": SEARCH_EPOCHS, "runs": len(results),
                                          "spread_small": SPREAD_SMALL, "spread_large": SPREAD_LARGE})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            data = quick_data(Path(tmp))
            epochs, budgets, seeds, search = {d: 1 for d in DATASETS}, (0.25,), args.seeds or (0,), 1
        else:
            data, epochs, budgets, seeds, search = (dict(zip(DATASETS, DATASETS)), EPOCHS, BUDGETS,
                                                   args.seeds or SEEDS, SEARCH_EPOCHS)
        jobs = jobs_for(args.datasets, budgets, seeds, epochs, data, search)
        done = [json.loads(line) for line in log.read_text().splitlines()] if args.resume and log.exists() else []
        if not args.resume:
            log.write_text("")
        seen = {key(r) for r in done}
        todo = [j for j in jobs if key(j) not in seen]
        started = time.time()
        print(f"{len(todo)} runs ({len(jobs) - len(todo)} already done), {args.jobs} worker(s)", file=sys.stderr)
        results = list(done)
        if args.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for r in pool.imap_unordered(run_one, todo):
                    results.append(r)
                    _log(log, r, len(results), len(jobs), started)
        else:
            for job in todo:
                results.append(run_one(job))
                _log(log, results[-1], len(results), len(jobs), started)
        meta = {"command": " ".join(["python", "benchmarks/methods.py", *(argv or sys.argv[1:])]),
                "epochs": epochs, "search_epochs": search, "budgets": list(budgets), "seeds": list(seeds), "jobs": args.jobs,
                "families": DATASETS, "wall_s_this_invocation": round(time.time() - started, 1),
                "spread_small": SPREAD_SMALL, "spread_large": SPREAD_LARGE}
        write_outputs(results, args.out, meta)
    print(f"wrote {args.out}/methods.json, methods.md, methods.png in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def _log(log: Path, r: dict[str, Any], n: int, total: int, started: float) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"[{n}/{total} {time.time() - started:5.0f}s] {r['dataset']} {r['label']} budget={r['budget']} "
          f"seed={r['seed']}: ensemble acc {100 * r['ensemble_acc']:.1f}% nll {r['ensemble_nll']:.3f} "
          f"({r['train_s']:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
