"""KServe v2 against TorchServe's API: closed-loop gRPC throughput of one embedded server over both.

    .venv/bin/python benchmarks/v2.py [CHECKPOINT] [--out benchmarks/results/v2.json] [--quick]

One `npas-serve serve` process; the same load generator (tests/support/loadgen.py) sends the
same batch-1 full-ensemble requests from `--clients` threads over TorchServe's gRPC API (npas
Client, protobuf payload by default: raw bytes, as v2's tensors travel) and over v2's `ModelInfer` (tritonclient.grpc, unmodified). The two alternate round by
round (AB, BA, ...) so that drift from other work on the machine hits both; the ratio is v2's
requests/s over TorchServe-API's, summed over the rounds. The load average is recorded at the
start and end: on a shared machine it says how much the figures can be trusted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/support: what the tests start and send too
from tests.support import servers as launch  # noqa: E402
from tests.support.loadgen import Call, percentiles_ms, run_load  # noqa: E402

PROTOCOLS = ("torchserve", "v2")
TARGET_RATIO = 0.9          # v2 within 10% of the TorchServe API


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, default=Path("runs/default"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/v2.json"))
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test, not figures")
    p.add_argument("--clients", type=int, default=16, help="concurrent client threads (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None, help="requests per round and protocol (default 400)")
    p.add_argument("--rounds", type=int, default=None, help="AB rounds (default 4; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch intra-op threads (default: 1)")
    p.add_argument("--fmt", choices=("protobuf", "json"), default="protobuf",
                   help="TorchServe-API payload format (default: %(default)s: raw bytes, as v2's tensors travel)")
    args = p.parse_args(argv)
    args.requests = args.requests or (24 if args.quick else 400)
    args.rounds = args.rounds or (1 if args.quick else 4)
    return args


def compare(target: str, x: np.ndarray, knobs: dict, clients: int, requests: int, rounds: int,
            fmt: str = "protobuf") -> dict:
    """Rounds of both protocols in alternating order; per protocol its runs and the totals."""
    call = Call(x, fmt=fmt, knobs=knobs)            # v2 ignores fmt: its tensors are raw bytes
    for protocol in PROTOCOLS:                      # warm the server, the channels and both paths
        run_load(target, None, [call] * clients * 2, clients, protocol=protocol)
    runs: dict[str, list] = {p: [] for p in PROTOCOLS}
    for r in range(rounds):
        for protocol in (PROTOCOLS if r % 2 == 0 else PROTOCOLS[::-1]):
            run = run_load(target, None, [call] * requests, clients, protocol=protocol)
            runs[protocol].append({"round": r, "requests": len(run.answered), "errors": len(run.failed),
                                   "wall_s": round(run.wall_s, 3),
                                   "requests_per_s": round(len(run.answered) / run.wall_s, 2),
                                   **percentiles_ms(run.results)})
    totals = {p: sum(x["requests"] for x in runs[p]) / sum(x["wall_s"] for x in runs[p]) for p in PROTOCOLS}
    return {"runs": runs, "requests_per_s": {p: round(v, 2) for p, v in totals.items()},
            "ratio_v2_over_torchserve": round(totals["v2"] / totals["torchserve"], 3)}


def main(argv=None) -> int:
    args = _parse_args(argv)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    manifest = json.loads((args.checkpoint / "manifest.json").read_text())
    shape = manifest.get("example_shape") or manifest["input_shape"]
    x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)
    knobs = {"ensemble_size": len(manifest["member_names"])}
    load_start = os.getloadavg()
    with launch.running_embedded(args.checkpoint, env) as server:
        result = compare(server.target, x, knobs, args.clients, args.requests, args.rounds, args.fmt)
    errors = sum(r["errors"] for runs in result["runs"].values() for r in runs)
    report = {"command": " ".join(["benchmarks/v2.py", *(argv if argv is not None else sys.argv[1:])]),
              "checkpoint": str(args.checkpoint), "clients": args.clients, "batch": 1, "knobs": knobs,
              "torchserve_fmt": args.fmt,
              "rounds": args.rounds, "requests_per_round": args.requests, "nproc": os.cpu_count(),
              "loadavg_start": [round(v, 2) for v in load_start],
              "loadavg_end": [round(v, 2) for v in os.getloadavg()], **result, "errors": errors,
              "target_ratio": TARGET_RATIO, "met": errors == 0 and result["ratio_v2_over_torchserve"] >= TARGET_RATIO}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    rps = report["requests_per_s"]
    print(f"v2 {rps['v2']} req/s, TorchServe API {rps['torchserve']} req/s: ratio "
          f"{report['ratio_v2_over_torchserve']} (target >= {TARGET_RATIO}), {args.clients} clients, "
          f"load average {report['loadavg_start'][0]} -> {report['loadavg_end'][0]} on {report['nproc']} CPUs; "
          f"wrote {args.out}")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
