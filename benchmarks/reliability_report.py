"""Turn the reliability tests' figures (reports/reliability.json) into docs/reliability.md.

    python benchmarks/reliability_report.py --run     # run tests/reliability, then write the doc
    python benchmarks/reliability_report.py           # write the doc from the last run's JSON

The JSON path follows the tests: $NPAS_RELIABILITY_REPORT, else reports/reliability.json.
Every figure in the doc comes from that file; nothing here is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "reports" / "reliability.json"
DEFAULT_DOC = ROOT / "docs" / "reliability.md"
SERVERS = ("embedded", "torchserve")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def bad_requests(fig: dict) -> list[str]:
    per = fig.get("bad_requests", {})
    if not per:
        return ["Not run."]
    fuzz = fig.get("wire_fuzz", {})
    out = table(["server", "bad requests tried", "refused as expected", "good answers right after",
                 "fuzzed requests (random bytes / maps)"],
                [[s, per[s]["cases"], per[s]["refused_as_expected"], per[s]["good_answers_after"],
                  fuzz.get(s, {}).get("examples", "not run")] for s in SERVERS if s in per])
    cases = sorted({c for s in per.values() for c in s["codes"]})
    out += ["", "Each case, the field the error names, and the gRPC code each server answered:", ""]
    out += table(["case", "field named", *[s for s in SERVERS if s in per]],
                 [[c, next(per[s]["codes"][c]["field"] for s in per if c in per[s]["codes"]),
                   *[per[s]["codes"].get(c, {}).get("code", "-") for s in SERVERS if s in per]] for c in cases])
    return out


def load(fig: dict) -> list[str]:
    per = fig.get("load", {})
    if not per:
        return ["Not run."]
    return table(["server", "clients", "requests sent", "answered", "failed", "lost", "mismatched",
                  "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s"],
                 [[s, r["clients"], r["sent"], r["ok"], r["failed"], r["lost"], r["mismatched"], r.get("p50_ms"),
                   r.get("p95_ms"), r.get("p99_ms"), r.get("max_ms"), r["requests_per_s"]]
                  for s, r in sorted(per.items())])


def faults(fig: dict) -> list[str]:
    per = fig.get("faults", {})
    out = []
    kill = per.get("torchserve_worker_sigkill")
    if kill:
        out += [f"**TorchServe worker SIGKILL under load** ({kill['clients']} clients): "
                f"{kill['sent']} requests sent, {kill['ok']} answered correctly, "
                f"{kill['failed_with_clear_error']} failed with a clear error "
                f"({', '.join(kill['error_codes']) or 'none'}"
                + (f": \"{kill['example_error']}\"" if kill["example_error"] else "") + "), "
                f"{kill['lost']} lost, {kill['mismatched']} mismatched; a new worker was READY "
                f"{kill['ready_again_s_after_kill']} s after the kill, {kill['ok_after_kill']} answers came after "
                f"the kill. Latency p50/p95/p99 {kill.get('p50_ms')}/{kill.get('p95_ms')}/{kill.get('p99_ms')} ms "
                f"(the p99 includes the restart). Survived: {'yes' if kill['survived'] else 'NO'}.", ""]
    drain = per.get("embedded_sigterm_drain")
    if drain:
        out += [f"**Embedded server SIGTERM with streams in flight**: {drain['in_flight_at_sigterm']} of "
                f"{drain['streams']} streams in flight at the signal, {drain['in_flight_completed_ok']} finished with "
                f"every refined answer and the right final one; the process exited with status "
                f"{drain['exit_code']} {drain['drain_s']} s after the signal; a new connection afterwards was "
                f"{'refused (UNAVAILABLE)' if drain['new_connection_refused'] else 'NOT refused'}. "
                f"Survived: {'yes' if drain['survived'] else 'NO'}.", ""]
    survived = sum(bool(f.get("survived")) for f in per.values())
    return out + [f"Faults survived: **{survived} of {len(per)}**."] if per else ["Not run."]


def model_files(fig: dict) -> list[str]:
    per = fig.get("model_files", {})
    sec = fig.get("security", {})
    out = []
    refusals = {k: v for k, v in per.items() if k.startswith("cli_")}
    if refusals:
        out += table(["command and bad file", "refused", "error"],
                     [[k[4:].replace("_", " ", 1), "yes" if v["refused"] else "NO", v["error"]]
                      for k, v in sorted(refusals.items())])
    for s in SERVERS:
        trap = per.get(f"trapped_checkpoint_{s}")
        if trap:
            out += ["", f"{s}: served a checkpoint carrying {trap['traps']} booby-trapped files "
                        f"(Python files, pickles, requirements.txt); traps that ran: **{trap['traps_that_ran']}**."]
    auth = sec.get("torchserve_token_auth")
    if auth:
        out += ["", "TorchServe token auth (default start, no `--dev`):", ""]
        out += table(["call", "answer"], [[k, v] for k, v in auth.items()])
    for s in SERVERS:
        socks = sec.get(f"listening_{s}")
        if socks is not None:
            out += ["", f"{s} listening sockets (from /proc/net/tcp and tcp6): {', '.join(socks)}"]
    return out or ["Not run."]


def render(fig: dict, command: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(fig.get("generated_unix", 0)))
    tried = sum(s["cases"] for s in fig.get("bad_requests", {}).values())
    fuzzed = sum(s["examples"] for s in fig.get("wire_fuzz", {}).values())
    under_load = sum(r["sent"] for r in fig.get("load", {}).values())
    faulted = fig.get("faults", {}).get("torchserve_worker_sigkill", {})
    lost = sum(r["lost"] for r in fig.get("load", {}).values()) + faulted.get("lost", 0)
    mismatched = sum(r["mismatched"] for r in fig.get("load", {}).values()) + faulted.get("mismatched", 0)
    survived = sum(bool(f.get("survived")) for f in fig.get("faults", {}).values())
    lines = [
        "# Reliability and security figures",
        "",
        f"Generated by `{command}` from `reports/reliability.json` (run of {when}, "
        f"{fig.get('cpu_count')} CPU cores, load average {fig.get('loadavg', ['?'])[0]} at the end; the tests' "
        "own clients and servers share those cores, so latencies are indicative). Do not edit by hand.",
        "",
        "Every test runs against real servers on loopback: the embedded gRPC server (`npas-serve serve`) and "
        "TorchServe 0.12 with the `.mar` from `npas-serve archive`, both serving the tiny trained family.",
        "",
        "## Summary",
        "",
        *table(["figure", "value"], [
            ["bad requests tried (table, both servers)", tried],
            ["fuzzed requests over the wire (both servers)", fuzzed],
            ["requests sent under load (both servers)", under_load],
            ["requests sent while a TorchServe worker was killed", faulted.get("sent", "not run")],
            ["lost responses", lost],
            ["mismatched responses", mismatched],
            ["faults survived", f"{survived} of {len(fig.get('faults', {}))}"],
        ]),
        "",
        "## 1. Bad requests",
        "",
        "Sent as raw `PredictionsRequest`s; each must be refused with an error whose text starts with the field "
        "name, and a good request right after must get the right answer from the same process (for TorchServe, "
        "from the same worker). Unknown model and version are routed by each server itself: the embedded server "
        "answers NOT_FOUND, TorchServe 0.12's frontend INTERNAL (`Model not found: …`, `Model version: … does "
        "not exist …`). A payload over the transport's message limit never reaches our code: grpcio answers "
        "RESOURCE_EXHAUSTED, TorchServe resets the stream (CANCELLED); both keep serving.",
        "",
        *bad_requests(fig),
        "",
        "## 2. Load",
        "",
        "Concurrent clients (threads, one channel each) share a fixed list of requests, bounded in count and "
        "time: mixed ensemble sizes, explicit members and anytime exits, JSON and protobuf payloads, batches of "
        "1 to 16. Each response must carry its own request_id and match a direct in-process `Engine` call on "
        "the same checkpoint (members, exit, predictions, probabilities within 1e-5). Latency is per request, "
        "measured by the client.",
        "",
        *load(fig),
        "",
        "## 3. Faults",
        "",
        *faults(fig),
        "",
        "## 4. Model files, token auth, binds",
        "",
        *model_files(fig),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run pytest tests/reliability first")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("NPAS_RELIABILITY_REPORT") or DEFAULT_JSON))
    parser.add_argument("--out", type=Path, default=DEFAULT_DOC)
    args = parser.parse_args(argv)
    if args.run:
        env = dict(os.environ, NPAS_RELIABILITY_REPORT=str(args.json.resolve()), OMP_NUM_THREADS="1")
        args.json.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/reliability"], cwd=ROOT, env=env)
        if done.returncode != 0:
            print(f"reliability tests failed (status {done.returncode}); not writing {args.out}", file=sys.stderr)
            return done.returncode
    if not args.json.is_file():
        print(f"{args.json} does not exist; run with --run (or pytest tests/reliability) first", file=sys.stderr)
        return 2
    command = "python benchmarks/reliability_report.py" + (" --run" if args.run else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(json.loads(args.json.read_text()), command))
    print(f"{args.out} <- {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
