"""`npas-serve`: the command line. It parses flags and calls the library; it decides nothing itself.

Every error a user can fix is printed as one line, `npas-serve: error: ...`,
with exit status 2, and leaves no half-written output behind.
"""
from __future__ import annotations

import argparse
import os
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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train all members of a family jointly on one bank",
                       description="Train every member of a family on one shared bank, then evaluate it. "
                                   "Writes a checkpoint (model.safetensors + manifest.json) into --out "
                                   "after every epoch, so --resume can continue an interrupted run.")
    p.add_argument("--family", default="mnist1d-resnet", help="registered family (default: %(default)s)")
    p.add_argument("--method", default="superweights", help="weight generator (default: %(default)s)")
    p.add_argument("--grouping", default="shape", help="which layers share banks (default: %(default)s)")
    p.add_argument("--budget", type=float, default=None,
                   help="bank size: <= 10 is a fraction of the largest member's shared parameters, "
                        "larger is a parameter count (default: the family's, 0.5 for the built-ins)")
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
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from npas_serve import registry
    from npas_serve.family import FamilySpec
    from npas_serve.train import TrainConfig, run_training

    registry.lookup("family", args.family)
    registry.lookup("generator", args.method)
    registry.lookup("grouping", args.grouping)
    epochs = args.epochs or registry.defaults("family", args.family).get("epochs", 60)
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      weight_decay=args.weight_decay, schedule=args.schedule, exit_weights=args.exit_weights,
                      seed=args.seed)
    spec = FamilySpec(family=args.family, method=args.method, budget=args.budget, grouping=args.grouping,
                      seed=args.seed)
    if args.num_classes:
        spec.family_kwargs["num_classes"] = args.num_classes
    rank, world = _distributed()
    data = args.data
    if data and args.num_classes and not args.resume:
        from npas_serve.data import load_dataset
        load_dataset(data, args.data_seed, args.num_classes)  # validate labels against --num-classes first
    family, manifest = run_training(spec, cfg, args.out, data=data, data_seed=args.data_seed,
                                    resume=args.resume, progress=not args.quiet, rank=rank, world=world)
    print(f"trained {len(family.names)} members ({', '.join(family.names)}) on {manifest.data}; "
          f"bank {family.generator.bank_numel():,} params -> {args.out}")
    if not args.no_eval and rank == 0:
        return _evaluate(args.out)
    return 0


def _distributed() -> tuple[int, int]:
    """Under torchrun, join the process group; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: JSON report + plots",
                       description="Per member, per exit and per ensemble size: accuracy, NLL, ECE, FLOPs "
                                   "and parameters. Writes report.json, ensemble.png and anytime.png into DIR "
                                   "and stores the report in the manifest for the planner.")
    p.add_argument("dir", type=Path, help="checkpoint directory")
    p.set_defaults(run=lambda a: _evaluate(a.dir))


def _evaluate(directory: Path) -> int:
    from npas_serve import registry
    from npas_serve.checkpoint import load_checkpoint
    from npas_serve.data import load_dataset
    from npas_serve.evaluate import evaluate, summary_lines, write_report

    family, manifest = load_checkpoint(directory)
    defaults = registry.defaults("family", manifest.spec.family)
    dataset = load_dataset(manifest.data, num_classes=manifest.num_classes).with_channels(
        defaults.get("input_ndim", 1))
    report = evaluate(family, manifest, dataset)
    write_report(report, manifest, directory)
    print("\n".join(summary_lines(report)))
    print(f"report -> {Path(directory) / 'report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npas-serve", epilog=EPILOG,
        description="Train one SuperWeight bank for several architectures, and serve ensembles "
                    "and anytime (early-exit) predictions from it under a latency budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval):
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
