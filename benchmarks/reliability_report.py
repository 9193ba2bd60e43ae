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


def hardening(fig: dict) -> list[str]:
    """Issue 13: the worker that died on one call, REST uploads, expiring keys, refused payloads,
    abandoned calls, interrupted checkpoint writes, CLI errors."""
    out = []
    health = fig.get("worker_health", {})
    unary = health.get("stream_true_in_unary_call")
    if unary:
        out += [f"**`stream: true` in a unary `Predictions` call to TorchServe** (it used to cost the worker for "
                f"good while every health check said READY): {unary['answer']}, the same worker kept serving, the "
                f"next good request was answered in {unary['next_good_request_s']} s.", ""]
    stopped = health.get("worker_stopped")
    if stopped:
        out += [f"**Readiness while the worker cannot answer** (worker process SIGSTOPped; the worker list still "
                f"said {stopped['worker_list_said']}): `npas-serve torchserve status` exited "
                f"{stopped['status_exit']}, `deploy/docker/healthcheck.py torchserve` (also every Kubernetes probe) "
                f"exited {stopped['healthcheck_exit']}; both passed again "
                f"{stopped['ready_again_s_after_resume']} s after SIGCONT.", ""]
    rest = fig.get("rest", {})
    if rest:
        out += ["**TorchServe REST** (curl with the inference key):", ""]
        out += table(["request", "HTTP status", "seconds"], [[k, v["http"], v["s"]] for k, v in sorted(rest.items())])
        out += [""]
    token = fig.get("token_renewal", {}).get("torchserve")
    if token:
        out += [f"**Token keys** (`torchserve start --token-lifetime-min {token['lifetime_min']}`): after the "
                f"first keys expired, `query --token-file` {token['query_after_expiry']}, `torchserve status` said "
                f"\"{token['status_after_expiry']}\", the key file held renewed keys "
                f"({'yes' if token['key_renewed'] else 'NO'}); the whole test took {token['test_s']} s.", ""]
    refused = fig.get("refused_payloads", {})
    if refused:
        out += ["**Maximum-size refused payloads** (4 clients, 4 MiB and just-under-the-limit JSON batches of "
                "one-number lists) while one client sends good batch-1 requests:", ""]
        out += table(["server", "refused (codes)", "good p50 idle ms", "good p50 loaded ms", "good max loaded ms",
                      "loaded / idle", "RSS idle MB", "RSS peak MB"],
                     [[s_, ", ".join(f"{c} {n}" for c, n in sorted(r["refused"].items())), r["good_ms_idle_p50"],
                       r["good_ms_loaded_p50"], r["good_ms_loaded_max"],
                       f"{r['good_ms_loaded_p50'] / r['good_ms_idle_p50']:.1f}x", r["rss_mb_idle"], r["rss_mb_peak"]]
                      for s_, r in sorted(refused.items())])
        out += [""]
    abandoned = fig.get("abandoned_calls", {})
    if abandoned:
        out += ["**Abandoned calls** (max-batch calls with a 1 ms gRPC deadline and `deadline_unix_ms` sent), then "
                "one good request:", ""]
        out += table(["server", "calls", "batch", "one such call run (s)", "next request answered after (s)"],
                     [[s_, r["calls"], r["batch"], r["one_call_run_s"], r["next_request_s"]]
                      for s_, r in sorted(abandoned.items())])
        out += [""]
    if fig.get("checkpoint_writes", {}).get("sigkill_while_writing_the_manifest", {}).get("served_after"):
        out += ["**Interrupted checkpoint write**: a writer SIGKILLed while writing the manifest (after the new "
                "tensor file) left the previous checkpoint whole; the embedded server answered from it.", ""]
    cli = fig.get("cli_errors", {})
    if cli:
        out += table(["CLI case", "one line, status 2"], [[k, v] for k, v in sorted(cli.items())])
    return out or ["Not run."]


def agreement(fig: dict) -> list[str]:
    per = fig.get("agreement", {})
    if not per:
        return ["Not run."]
    cases = sorted({k.split("|")[0] for k in per})
    return table(["case", *SERVERS], [[c, *[per.get(f"{c}|{s_}", "-") for s_ in SERVERS]] for c in cases])


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
        "from the same worker). Unknown model and version: INTERNAL on both servers (TorchServe 0.12's frontend "
        "answers so, `Model not found: …`, `Model version: … does not exist …`, and the embedded server does the "
        "same; section 6). A payload over the transport's message limit never reaches our code: grpcio answers "
        "RESOURCE_EXHAUSTED (its limit is the payload limit plus 64 KiB), TorchServe resets the stream "
        "(CANCELLED); both keep serving. The payload limit is what the largest valid request can need (batch and "
        "example shape), at most the configured 4 MiB, and a JSON payload's lists and separators are counted "
        "before it is parsed.",
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
        "A manifest is checked against bounds before anything is allocated from it: input shape, members, exits, "
        "and num_classes / budget_params / in_channels against what the (not yet read) tensor file can hold; a "
        "finite normalisation with std > 0; the report's structure. A `.mar` member is refused by its declared "
        "sizes (at most 20x its compressed size) and extraction stops at them.",
        "",
        *model_files(fig),
        "",
        "## 5. Worker health, REST, keys, refused payloads, abandoned calls, checkpoint writes",
        "",
        "TorchServe 0.12 sends its worker each request's id, headers and input map, never the command: a gRPC "
        "`Predictions` and a `StreamPredictions` call look the same to the handler (no headers at all), an HTTP "
        "request carries its HTTP headers, the management API's describe a `describe: True` header "
        "(`npas_serve/servers/torchserve/calls.py`). A second message to a unary call makes the frontend throw and "
        "lose the worker, so the handler answers every TorchServe call with exactly one message. Readiness "
        "(`torchserve status`, the Docker healthcheck, the Kubernetes startup, readiness and liveness probes) is "
        "the management API's `GET /models/NAME?customized=true`, which waits in the worker's queue and is "
        "answered by the handler itself. Token keys live `token_expiration_min` (60 by default); a renewer in "
        "TorchServe's process group renews each at half its lifetime through the never-expiring API key, and the "
        "CLI and `Client(token=callable)` read key_file.json for every call. Request bodies reach the handler as "
        "bytes (`decode_input_request=false`), so their size is checked before anything parses them. TorchServe "
        "passes no gRPC deadline to its worker: a deadline reaches it only as `deadline_unix_ms` in the request, "
        "and both servers refuse a request whose deadline has passed (DEADLINE_EXCEEDED) without running it. "
        "Checkpoints are written into a new directory that replaces the old one in one rename "
        "(`files.write_dir_atomic`; Linux RENAME_EXCHANGE), the training state included.",
        "",
        *hardening(fig),
        "",
        "## 6. Where the servers disagreed: one behaviour on both",
        "",
        "- `StreamPredictions` sends refined answers only when the request sets `stream` (the embedded server "
        "used to send them always). Only the embedded server can send them: TorchServe 0.12 does not tell its "
        "worker which RPC it serves, so there every call gets the final answer alone. Either way the last "
        "message is the final answer, the same on both; `Predictions` always gets one.",
        "- `StreamPredictions2`: refused in-band on both, as TorchServe 0.12 does without sequence batching: the "
        "call is OK and each message carries `status` INTERNAL with the reason.",
        "- Unknown model or version: INTERNAL (`Model not found: …`) on both, as TorchServe's frontend answers "
        "before any handler code runs (the embedded server said NOT_FOUND).",
        "- Knobs of the other mode are refused, not ignored: `exit` or `min_confidence` in ensemble mode, "
        "`ensemble_size` or more than one member in anytime mode. `true`/`false` among the inputs are refused "
        "(they were read as 1.0 and 0.0).",
        "- Over REST, knobs go in the payload or as multipart form fields: TorchServe 0.12 drops the query string "
        "of `/predictions/...` before its worker sees the request.",
        "- Still different: a request refused while it shares a TorchServe batch with others (archives batch, "
        "`batchSize` 32) reaches a raw gRPC client as an OK reply holding `{\"error\", \"field\"}`, because "
        "TorchServe 0.12's gRPC frontend drops a per-request status (HTTP clients get it); `Client` raises it as "
        "INVALID_ARGUMENT, and a refused request alone in its batch is INVALID_ARGUMENT on both servers.",
        "",
        *agreement(fig),
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
