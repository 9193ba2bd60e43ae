"""`npas-serve`: the command line. It parses flags and calls the library; it decides nothing itself.

Every error a user can fix is printed as one line, `npas-serve: error: ...`,
with exit status 2, and leaves no half-written output behind.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from npas_serve.errors import UserError

EPILOG = "Run `npas-serve COMMAND --help` for a command's flags."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _host(text: str) -> str:
    """An address this machine may bind: an IP literal or a name that resolves."""
    import ipaddress
    import socket

    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    try:
        socket.getaddrinfo(text, None)
    except (socket.gaierror, UnicodeError):
        raise argparse.ArgumentTypeError(f"{text!r} is neither an IP address nor a name that resolves") from None
    return text


def _generator_arg(text: str) -> tuple[str, int | float | str]:
    """KEY=VALUE; the value becomes an int, else a float, else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key.strip(), parse(value)
        except ValueError:
            pass
    return key.strip(), value


def _deprecated(message: str) -> None:
    print(f"npas-serve: note: {message}", file=sys.stderr)


class _Renamed(argparse.Action):
    """The old spelling of a flag: does the new flag's job (store, or append) and says so once on stderr."""

    def __init__(self, option_strings, dest, new: str, append: bool = False, **kwargs):
        self.new, self.append = new, append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        noted = namespace.__dict__.setdefault("_noted", set())
        if option_string not in noted:
            noted.add(option_string)
            _deprecated(f"{option_string} is deprecated; use {self.new}")
        if self.append:
            values = [*(getattr(namespace, self.dest) or []), values]
        setattr(namespace, self.dest, values)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train all members of a family jointly on one bank",
                       description="Train every member of a family on one shared bank, then evaluate it. "
                                   "Writes a checkpoint (model.safetensors + manifest.json) into --out "
                                   "after every epoch, so --resume can continue an interrupted run. "
                                   "On several processes: torchrun --nproc-per-node N -m npas_serve.cli train ...")
    p.add_argument("--family", default="mnist1d-resnet",
                   help="registered family, or your own builder as path/to/file.py:function or "
                        "package.module:function (its source is stored with the checkpoint; see "
                        "docs/own-model.md) (default: %(default)s)")
    p.add_argument("--generator", default="superweights",
                   help="weight generator: superweights, ssn, arbnet (default: %(default)s)")
    p.add_argument("--method", dest="generator", action=_Renamed, new="--generator", help=argparse.SUPPRESS)
    p.add_argument("--generator-arg", type=_generator_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a generator option, repeatable, e.g. --generator ssn --generator-arg down=emb "
                        "--generator-arg up=mask, or --generator arbnet --generator-arg hash=neighborhood "
                        "--generator-arg spread=2")
    p.add_argument("--method-arg", dest="generator_arg", type=_generator_arg, action=_Renamed,
                   new="--generator-arg", append=True, help=argparse.SUPPRESS)
    p.add_argument("--grouping", default="shape",
                   help="which layers share banks: shape, random, unshared, or searched by a warm-up: "
                        "gradient (SuperWeights), kmeans (SSN) (default: %(default)s)")
    p.add_argument("--search-epochs", type=_positive_int, default=None,
                   help="warm-up epochs of a searched grouping (default: 10%% of --epochs, at least 2)")
    p.add_argument("--unshare-epoch", type=int, default=None,
                   help="split shared coefficients after this epoch (gradient grouping; default: 5%% "
                        "of --epochs, at least 1; 0 never)")
    p.add_argument("--budget", type=float, default=None,
                   help="bank size as a fraction of the largest member's shared parameters "
                        "(default: the family's, e.g. 0.85 for mnist1d-resnet)")
    p.add_argument("--budget-params", type=int, default=None,
                   help="bank size as a parameter count, instead of --budget")
    p.add_argument("--data", default=None,
                   help="mnist1d, digits, or a path to an .npz with x and y (default: the family's)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of generated data (mnist1d)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of .npz data (default: max label + 1)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="default: the family's")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--exit-weights", type=float, nargs="+", default=None,
                   help="loss weight of each exit (default: (e+1)/E)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, grouping and shuffling")
    p.add_argument("--validation", type=float, default=0.1, metavar="FRACTION",
                   help="share of the training examples held out (drawn with --seed, recorded in the "
                        "manifest): it orders the members for ensemble_size=k, gives the planner its "
                        "accuracies and fits the temperatures that calibrate every answer (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    _add_trust_code(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)


def _add_trust_code(p) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="load a checkpoint or archive that carries its family's Python code (a family "
                        "trained with --family FILE.py:FUNCTION); loading runs that code")


def _budget(args: argparse.Namespace) -> tuple[float | None, int | None]:
    """(fraction, count); the old `--budget N` with N > 10, a count, still works with a note."""
    if args.budget is not None and math.isfinite(args.budget) and args.budget > 10:
        if args.budget_params is not None:
            raise UserError("give --budget or --budget-params, not both")
        _deprecated(f"--budget {args.budget:g} as a parameter count is deprecated; use --budget-params "
                    f"{int(args.budget)} (--budget is a fraction of the largest member)")
        return None, int(args.budget)
    return args.budget, args.budget_params


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from npas_serve import registry
    from npas_serve.family import FamilySpec
    from npas_serve.families.user import is_reference
    from npas_serve.train import TrainConfig, process_group, run_training, saved_config

    if args.out.exists() and not args.out.is_dir():      # found before training, not after it
        raise UserError(f"--out {args.out} is a file; a checkpoint is a directory")
    if not is_reference(args.family):
        registry.lookup("family", args.family)
    registry.lookup("generator", args.generator)
    registry.lookup("grouping", args.grouping)
    if args.resume:
        # continue the run as it was configured; only --epochs may extend it
        cfg = saved_config(args.out)
        cfg = replace(cfg, epochs=args.epochs or cfg.epochs)
    else:
        epochs = args.epochs or (60 if is_reference(args.family)
                                 else registry.meta("family", args.family).get("epochs", 60))
        cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                          weight_decay=args.weight_decay, schedule=args.schedule,
                          exit_weights=args.exit_weights, seed=args.seed, search_epochs=args.search_epochs,
                          unshare_epoch=args.unshare_epoch, validation=args.validation)
    budget, budget_params = _budget(args)
    spec = FamilySpec(family=args.family, family_kwargs={"num_classes": args.num_classes} if args.num_classes else {},
                      generator=args.generator, generator_kwargs=dict(args.generator_arg), budget=budget,
                      budget_params=budget_params, grouping=args.grouping, seed=args.seed)
    with process_group() as (rank, world):
        # run_training validates the data (labels against --num-classes too) before writing anything
        family, manifest = run_training(spec, cfg, args.out, data=args.data, data_seed=args.data_seed,
                                        resume=args.resume, progress=not args.quiet, rank=rank, world=world,
                                        trust_code=args.trust_code)
    if rank != 0:              # rank 0 wrote the checkpoint; it alone reports and evaluates
        return 0
    print(f"trained {len(family.names)} members ({', '.join(family.names)}) on {manifest.data}"
          f"{f' with {world} processes' if world > 1 else ''}; "
          f"bank {family.generator.bank_numel():,} params -> {args.out}")
    if not args.no_eval:
        return _evaluate(args.out, trust_code=True)   # the code this run trained with, or --trust-code
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: JSON report + plots",
                       description="Per member, per exit and per ensemble size: accuracy, NLL, ECE, FLOPs "
                                   "and parameters. Writes report.json, ensemble.png and anytime.png into DIR "
                                   "and stores the report in the manifest for the planner.")
    p.add_argument("dir", type=Path, help="checkpoint directory")
    _add_trust_code(p)
    p.set_defaults(run=lambda a: _evaluate(a.dir, a.trust_code))


def _evaluate(directory: Path, trust_code: bool = False) -> int:
    from npas_serve.checkpoint import load_checkpoint
    from npas_serve.data import load_dataset
    from npas_serve.evaluate import evaluate, summary_lines, write_report

    family, manifest = load_checkpoint(directory, trust_code=trust_code)
    dataset = load_dataset(manifest.data, num_classes=manifest.num_classes).shaped_as(manifest.input_shape)
    report = evaluate(family, manifest, dataset)
    write_report(report, manifest, directory)
    print("\n".join(summary_lines(report)))
    print(f"report -> {Path(directory) / 'report.json'}")
    return 0


def _check_device(device: str) -> None:
    """A device this machine has, before any file is read (a missing GPU is not a model-file problem)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r} is not a device: {err}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N")


def _engine_config(args: argparse.Namespace):
    from npas_serve.engine import EngineConfig

    _check_device(args.device)
    return EngineConfig(device=args.device, cache_bytes=args.cache_bytes, max_batch=args.max_batch,
                        model_name=args.name, freeze=args.freeze, trust_code=args.trust_code,
                        batch_examples=args.batch_examples, batch_delay_ms=args.batch_delay_ms,
                        queue_examples=args.queue_examples, threads=args.threads, trace=not args.eager)


def _add_engine_flags(p) -> None:
    p.add_argument("--name", default="npas", help="model name clients ask for (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--cache-bytes", type=_non_negative_int, default=0,
                   help="LRU cache of generated weights, in bytes; 0 keeps only the shared parameters")
    p.add_argument("--max-batch", type=_positive_int, default=256, help="largest batch a request may carry")
    p.add_argument("--batch-examples", type=_positive_int, default=256,
                   help="most examples the engine runs as one batch across requests (default: %(default)s)")
    p.add_argument("--queue-examples", type=_positive_int, default=None,
                   help="most examples waiting for the device; past it a request is refused with "
                        "RESOURCE_EXHAUSTED (default: 4 x --batch-examples)")
    p.add_argument("--batch-delay-ms", type=_non_negative_int, default=0,
                   help="wait up to this long for a batch to fill; 0 runs what is queued at once (default)")
    p.add_argument("--threads", type=_non_negative_int, default=1,
                   help="torch intra-op threads; 1 (default) is fastest under load, 0 keeps torch's default")
    p.add_argument("--freeze", action="store_true",
                   help="generate every member's weights once at load and serve plain modules "
                        "(faster; holds all generated weights instead of only the shared parameters)")
    p.add_argument("--eager", action="store_true",
                   help="run stages and weight generation eagerly instead of as TorchScript traces "
                        "(slower; the traces are checked against eager at load, so this is for debugging)")
    _add_trust_code(p)


def _add_archive(sub) -> None:
    p = sub.add_parser("archive", help="pack a checkpoint into model_store/NAME.mar for TorchServe",
                       description="Verify a checkpoint, then pack it with the TorchServe handler into a .mar.")
    p.add_argument("dir", type=Path, help="checkpoint directory")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--version", default="1")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="TorchServe's batch: calls handed to the worker at once (default: 32)")
    p.add_argument("--max-batch-delay-ms", type=_non_negative_int, default=None,
                   help="TorchServe waits up to this long for its batch to fill (default: 2)")
    _add_engine_flags(p)
    p.set_defaults(run=_archive)


def _archive(args: argparse.Namespace) -> int:
    from npas_serve.servers.torchserve.archive import build_archive

    batching = {k: v for k, v in (("batch_size", args.batch_size),
                                  ("max_batch_delay_ms", args.max_batch_delay_ms)) if v is not None}
    target = build_archive(args.dir, args.name, args.model_store, args.version, _engine_config(args),
                           trust_code=args.trust_code, **batching)
    print(f"archive -> {target}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the embedded gRPC server (no Java needed)",
                       description="Serve a checkpoint directory or a .mar with TorchServe's gRPC inference "
                                   "API, the gRPC health service and Prometheus /metrics. SIGTERM drains "
                                   "in-flight requests, then exits.")
    p.add_argument("model", type=Path, help="checkpoint directory or .mar file")
    p.add_argument("--host", type=_host, default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--grpc-port", type=_any_port, default=7070, help="0: any free port")
    p.add_argument("--metrics-port", type=_any_port, default=8082, help="0: any free port")
    p.add_argument("--http-port", type=_any_port, default=None,
                   help="also serve the KServe v2 REST endpoints on this port (v2 gRPC is always on --grpc-port)")
    p.add_argument("--version", default="1")
    p.add_argument("--in-process", action="store_true",
                   help="run the engine in the server's own process; by default it runs in a child process, "
                        "so gRPC's Python and the device thread do not share one GIL (faster under load)")
    _add_engine_flags(p)
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import tempfile

    from npas_serve.servers.torchserve.archive import extract_archive
    from npas_serve.engine import Engine
    from npas_serve.servers.engine_process import EngineProcess
    from npas_serve.servers.grpc_server import serve

    with tempfile.TemporaryDirectory() as tmp:
        model = extract_archive(args.model, tmp) if args.model.suffix == ".mar" else args.model
        config = _engine_config(args)
        config.model_version = args.version
        if args.in_process:
            engine, metrics_port = Engine.load(model, config), args.metrics_port
        else:                      # the engine and its metrics in a child process (servers/engine_process.py)
            engine, metrics_port = EngineProcess(model, config, args.host, args.metrics_port), None
        serve(engine, args.host, args.grpc_port, metrics_port, args.name, args.version, http_port=args.http_port)
    return 0


def _add_torchserve(sub) -> None:
    p = sub.add_parser("torchserve", help="start, stop or inspect TorchServe for a .mar",
                       description="Run TorchServe (Java frontend) with gRPC on 7070/7071, HTTP on 8080/8081 "
                                   "and metrics on 8082 (or the ports given to start; status and stop read "
                                   "them from RUN_DIR). Token auth is on unless --dev; the keys are in "
                                   "RUN_DIR/key_file.json.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--name", default="npas")
    p.add_argument("--run-dir", type=Path, default=Path(".torchserve"),
                   help="where config, logs, pid and key files go (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dev", action="store_true", help="turn token auth off (local development only)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for a worker that answers")
    p.add_argument("--token-lifetime-min", type=float, default=60.0,
                   help="start: minutes a token key lives (TorchServe's token_expiration_min); a renewer "
                        "replaces the keys in RUN_DIR/key_file.json before they expire (default: %(default)s)")
    for field, flag in _TS_PORT_FLAGS.items():
        p.add_argument(flag, type=_port, dest=f"{field}_port", default=None,
                       help=f"start: the {field.replace('_', ' ')} port (default: as in the description)")
    p.set_defaults(run=_torchserve)


_TS_PORT_FLAGS = {"grpc": "--grpc-port", "grpc_management": "--grpc-management-port", "http": "--http-port",
                  "management": "--management-port", "metrics": "--metrics-port"}


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port, 1..65535, got {value}")
    return value


def _any_port(text: str) -> int:
    """A port, or 0 for any free one."""
    return 0 if text.strip() == "0" else _port(text)


def _torchserve(args: argparse.Namespace) -> int:
    from npas_serve.servers.torchserve import launcher as ts
    from npas_serve.servers.torchserve.keys import KEY_FILE

    given = {field: getattr(args, f"{field}_port") for field in _TS_PORT_FLAGS}
    ports = ts.Ports(**{field: port for field, port in given.items() if port is not None})
    configured = ts.read_config(args.run_dir) if args.action != "start" else None
    if configured is not None:           # the ports and address this run directory was started with
        ports, args.host = configured.ports, configured.host
    if args.action == "start":
        pid = ts.start(args.model_store, args.name, args.run_dir, args.host, ports, args.dev, args.timeout,
                       token_lifetime_min=args.token_lifetime_min)
        auth = "off (--dev)" if args.dev else f"on; inference key in {args.run_dir / KEY_FILE}"
        print(f"TorchServe running (pid {pid}): gRPC {args.host}:{ports.grpc}, "
              f"metrics http://{args.host}:{ports.metrics}/metrics, token auth {auth}")
    elif args.action == "stop":
        print("stopped" if ts.stop(args.run_dir) else "not running")
    else:
        state = ts.status(args.run_dir, args.name, ports, args.host)
        print(state.text)
        return 0 if state.ready else 1        # a script (or a probe) can act on "no worker answers"
    return 0


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="send one request over gRPC and print the answer",
                       description="Query a running server (embedded or TorchServe). Inputs come from "
                                   "--inputs FILE.npy / .npz (x), or --test-examples N from the model's data.")
    p.add_argument("--target", default="127.0.0.1:7070")
    p.add_argument("--name", default="npas")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ensemble-size", default=None, help="members to combine, 1..N or auto")
    group.add_argument("--anytime", action="store_true", help="anytime (early-exit) mode")
    p.add_argument("--exit", default=None, help="anytime: exit to stop at")
    p.add_argument("--members", nargs="+", default=None, help="explicit member names")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget in milliseconds")
    p.add_argument("--min-confidence", type=float, default=None)
    p.add_argument("--stream", action="store_true", help="StreamPredictions: print every refined answer")
    p.add_argument("--inputs", type=Path, default=None, help=".npy, or .npz with x")
    p.add_argument("--data", default="mnist1d", help="data to draw test examples from (default: %(default)s)")
    p.add_argument("--test-examples", type=_positive_int, default=4)
    p.add_argument("--format", choices=["json", "protobuf"], default="json")
    p.add_argument("--token", default=None, help="TorchServe inference key")
    p.add_argument("--token-file", type=Path, default=None, help="TorchServe key_file.json")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(run=_query)


def _query(args: argparse.Namespace) -> int:
    import numpy as np

    from npas_serve.client import Client, ClientError

    if args.inputs is not None:
        if not args.inputs.is_file():
            raise UserError(f"{args.inputs} does not exist")
        try:
            loaded = np.load(args.inputs, allow_pickle=False)
            x = loaded["x"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
        except (ValueError, OSError, KeyError, EOFError) as err:   # object arrays, not .npy, no x in .npz
            raise UserError(f"{args.inputs} holds no numeric array to send: {err}") from None
        if x.dtype.kind not in "iuf":
            raise UserError(f"{args.inputs} holds {x.dtype} values; send a numeric array")
        labels = None
    else:
        from npas_serve.data import load_dataset

        dataset = load_dataset(args.data)
        x, labels = dataset.x_test[: args.test_examples], dataset.y_test[: args.test_examples]
        x = x[:, None] if x.ndim == 2 else x
    token = args.token
    if token is None and args.token_file is not None:
        from npas_serve.servers.torchserve.keys import read_key

        read_key(args.token_file, "inference")       # a missing or keyless file is one error line now
        token = lambda: read_key(args.token_file, "inference")  # noqa: E731  read again after a renewal
    knobs = {"mode": "anytime" if args.anytime else "ensemble", "ensemble_size": args.ensemble_size,
             "exit": args.exit, "members": args.members, "latency_budget_ms": args.budget_ms,
             "min_confidence": args.min_confidence}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    try:
        with Client(args.target, args.name, token=token, timeout=args.timeout) as client:
            answers = client.stream(x, fmt=args.format, **knobs) if args.stream else [
                client.predict(x, fmt=args.format, **knobs)]
            for a in answers:
                used = f"exit {a.exit_reached} of {a.members_used[0]}" if a.exit_reached is not None \
                    else f"members {', '.join(a.members_used)}"
                budget = "" if a.budget_met is None else f", budget {'met' if a.budget_met else 'MISSED'}"
                print(f"{'final' if a.final else 'partial'}: predictions {a.predictions} ({used}; "
                      f"{a.latency_ms:.1f} ms{budget})")
                print(f"  entropy {[round(v, 3) for v in a.entropy]}, "
                      f"disagreement {[round(v, 2) for v in a.disagreement]}")
    except ClientError as err:
        raise UserError(f"server answered {err}") from None
    if labels is not None:
        print(f"  labels      {labels.tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npas-serve", epilog=EPILOG,
        description="Train one SuperWeight bank for several architectures, and serve ensembles "
                    "and anytime (early-exit) predictions from it under a latency budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_archive, _add_serve, _add_torchserve, _add_query):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"npas-serve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npas-serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
