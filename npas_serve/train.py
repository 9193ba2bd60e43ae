"""Train every member of a family jointly on one bank.

The loss is the sum over members of their exit-weighted cross-entropies on the
same minibatch, so every member's gradient reaches the shared bank. Training is
seeded and deterministic on CPU; a checkpoint is written after every epoch and
`resume` continues from it bit for bit (the shuffle of epoch e depends only on
(seed, e), and the optimiser state travels in safetensors, never in a pickle).

Run as a module for several processes (DistributedDataParallel over gloo):
    torchrun --nproc-per-node 2 -m npas_serve.train --out runs/ddp
Each rank takes an equal slice of every global batch, batch norm normalises with
the statistics of the whole global batch (`GlobalBatchNorm`), and rank 0 alone
writes the checkpoint, so K processes train the model one process would.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npas_serve import registry
from npas_serve.checkpoint import (MANIFEST, Manifest, load_checkpoint, load_tensors, save_checkpoint,
                                   save_tensors, write_json)
from npas_serve.data import Dataset, is_path, load_dataset
from npas_serve.errors import UserError
from npas_serve.family import Family, FamilySpec, build_family

TRAIN_STATE = "train_state.safetensors"
TRAIN_META = "train_state.json"


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "adamw"        # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-2      # never applied to coefficients, norms or biases
    momentum: float = 0.9           # sgd only (Nesterov)
    schedule: str = "cosine"        # cosine | step | constant, applied per step
    exit_weights: list[float] | None = None   # None: (e + 1) / E, the last exit weighs most
    seed: int = 0
    search_epochs: int | None = None  # warm-up of a searched grouping; None: 10% of epochs, >= 2 (search.py)
    unshare_epoch: int | None = None  # split shared coefficients after it; None: 5% of epochs, >= 1; 0: never

    def checks(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise UserError(f"need epochs >= 1 and batch size >= 2, got {self.epochs} and {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; known: adamw, sgd")
        if self.schedule not in ("cosine", "step", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}; known: cosine, step, constant")
        if not (self.lr > 0) or self.weight_decay < 0:
            raise UserError(f"need lr > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        if min(self.search_epochs or 1, 1 if self.unshare_epoch is None else self.unshare_epoch + 1) < 1:
            raise UserError(f"need search epochs >= 1 and unshare epoch >= 0, "
                            f"got {self.search_epochs} and {self.unshare_epoch}")


def exit_weights(cfg: TrainConfig, num_exits: int) -> list[float]:
    if cfg.exit_weights is None:
        return [(e + 1) / num_exits for e in range(num_exits)]
    if len(cfg.exit_weights) != num_exits or min(cfg.exit_weights) < 0:
        raise UserError(f"need {num_exits} non-negative exit weights, got {cfg.exit_weights}")
    return list(cfg.exit_weights)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if cfg.schedule == "step":   # x0.2 at 30%, 60% and 80% of training, as the SuperWeights recipe
        return 0.2 ** sum(step >= total * f for f in (0.3, 0.6, 0.8))
    return 1.0


def make_optimizer(family: Family, cfg: TrainConfig) -> torch.optim.Optimizer:
    no_decay_ids = {id(p) for p in family.generator.no_decay_parameters()}
    decay, no_decay = [], []
    for name, p in family.named_parameters():
        # coefficients, norms and biases (all 1-D or listed by the generator) get no weight decay
        (no_decay if id(p) in no_decay_ids or p.ndim <= 1 and "generator" not in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def family_loss(outputs: Sequence[Sequence[torch.Tensor]], y: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Sum over members of the exit-weighted cross-entropies."""
    return sum(w * F.cross_entropy(logits, y) for exits in outputs for w, logits in zip(weights, exits))


def batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """The index batches of one epoch; a function of (seed, epoch) only, so resume replays it exactly.

    With several processes each rank takes an equal slice of every global batch.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    out = []
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < max(2, world * 2):    # batch norm needs two examples per process
            continue
        per = len(idx) // world
        out.append(idx[rank * per:(rank + 1) * per])
    return out


def train_epochs(family: Family, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, cfg: TrainConfig, start_epoch: int = 0,
                 on_epoch: Callable[[int, float], None] | None = None, progress: bool = True,
                 rank: int = 0, world: int = 1, end_epoch: int | None = None) -> list[float]:
    """The loop itself, epochs `start_epoch` to `end_epoch` (default: all) of the schedule.

    `model` is the family, or its DistributedDataParallel wrapper.
    """
    from tqdm import tqdm

    weights = exit_weights(cfg, family.num_exits)
    steps_per_epoch = len(batches(len(x), cfg.batch_size, cfg.seed, 0, rank, world))
    total = cfg.epochs * steps_per_epoch
    losses = []
    # a live bar on a terminal; in a log (CI, a pipe) one line per tenth of the run instead
    show = progress and rank == 0
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train", unit="step",
               disable=not (show and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True)
    family.train()
    for epoch in range(start_epoch, cfg.epochs if end_epoch is None else end_epoch):
        running, count = 0.0, 0
        for i, idx in enumerate(batches(len(x), cfg.batch_size, cfg.seed, epoch, rank, world)):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch + i, total)
            loss = family_loss(model(x[idx]), y[idx], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count = running + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / count:.3f}")
        losses.append(_mean_over_ranks(running / max(count, 1), world))
        if show and bar.disable and (epoch + 1) % max(1, cfg.epochs // 10) == 0:
            print(f"train: epoch {epoch + 1}/{cfg.epochs}, loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
    bar.close()
    family.eval()
    return losses


def _mean_over_ranks(value: float, world: int) -> float:
    """An epoch's loss over the global batches, not rank 0's slices (one collective per epoch)."""
    if world == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world


# --- several processes: batch norm over the global batch ---------------------------------------------

class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, summed over all ranks.

    Per-rank statistics would make K processes train a different model from one process
    on the same global batch (each half normalised by its own mean and variance).
    `nn.SyncBatchNorm` fixes that but refuses CPU tensors (torch 2.13: GPU/XPU only),
    so the sums travel through the differentiable functional `all_reduce` instead: its backward
    all-reduces the gradient too, so every rank also backpropagates the other ranks'
    dependence on its examples, as SyncBatchNorm does. Outside training, or in a single
    process, it is plain batch norm; parameters, buffers and state-dict keys are BatchNorm's.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed._functional_collectives as funcol

        def all_reduce(t: torch.Tensor) -> torch.Tensor:     # a sum; its backward sums gradients
            return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))

        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.size(1)])])
        summed = all_reduce(local)
        count = summed[-1].detach()
        mean = summed[:-1] / count
        centred = x - mean.view(shape)                 # two passes, like single-process batch norm
        var = all_reduce(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)   # unbiased, as BatchNorm keeps
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm under `module` (on its parent) by a GlobalBatchNorm sharing its tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if getattr(child, key, None) is not None:
                    setattr(synced, key, getattr(child, key))
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module


# --- the job: data + family + checkpoints ----------------------------------------------------------

def prepare_data(spec: FamilySpec, data: str | None, data_seed: int | None) -> tuple[str, Dataset]:
    defaults = registry.defaults("family", spec.family)
    name = data or defaults.get("data", "mnist1d")
    if is_path(name):   # the manifest must find the file again from any working directory
        name = str(Path(name).resolve())
    # the family's class count (--num-classes, or the manifest's on resume) is the data's too
    dataset = load_dataset(name, seed=data_seed, num_classes=spec.family_kwargs.get("num_classes"))
    dataset = dataset.with_channels(defaults.get("input_ndim", 1))
    spec.family_kwargs.setdefault("num_classes", dataset.num_classes)
    spec.family_kwargs.setdefault("in_channels", dataset.input_shape[0])
    return name, dataset


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig,
                     losses: list[float]) -> None:
    state = optimizer.state_dict()
    tensors = {f"state.{idx}.{k}": v for idx, s in state["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    sha = save_tensors(directory / TRAIN_STATE, tensors)
    write_json(directory / TRAIN_META, {"epoch": epoch, "config": asdict(cfg), "losses": losses,
                                        "param_groups": state["param_groups"], "sha256": sha})


def saved_config(directory: Path) -> TrainConfig:
    """The training settings of the run in `directory`, for --resume."""
    path = Path(directory) / TRAIN_META
    if not path.is_file():
        raise UserError(f"{directory} has no {TRAIN_META} to resume from")
    return TrainConfig(**json.loads(path.read_text())["config"])


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    meta = json.loads((directory / TRAIN_META).read_text())
    tensors = load_tensors(directory / TRAIN_STATE, meta["sha256"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["epoch"]), list(meta["losses"])


def run_training(spec: FamilySpec, cfg: TrainConfig, out: Path, data: str | None = None,
                 data_seed: int | None = None, resume: bool = False, progress: bool = True,
                 rank: int = 0, world: int = 1) -> tuple[Family, Manifest]:
    """Train (or resume) and leave a checkpoint in `out`. Checks everything before writing anything."""
    cfg.checks()
    out = Path(out)
    if resume:
        family, manifest = load_checkpoint(out)
        spec, data = manifest.spec, manifest.data
        if not (out / TRAIN_META).is_file():
            raise UserError(f"{out} has no {TRAIN_META} to resume from")
    elif (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    data, dataset = prepare_data(spec, data, data_seed)
    norm = manifest.normalisation if resume else dataset.normalisation()
    x = torch.from_numpy(norm.apply(dataset.x_train))
    y = torch.from_numpy(dataset.y_train)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        if not resume:
            if spec.groups is None and registry.defaults("grouping", spec.grouping).get("trains"):
                # a searched grouping trains a throw-away family first (search.py); its groups are kept
                _check_shapes(build_family(replace(spec, grouping="shape")), x, dataset)
                spec.groups = registry.create("grouping", spec.grouping, spec, x, y, cfg)
            family = build_family(spec)
            manifest = Manifest(spec=spec, member_names=family.names, num_exits=family.num_exits,
                                input_shape=list(dataset.input_shape), num_classes=dataset.num_classes,
                                normalisation=norm, budget_params=family.budget_params, data=data)
        family.train()
        _check_shapes(family, x, dataset)
        _train_from(family, manifest, cfg, out, x, y, resume, progress, rank, world)
    finally:
        torch.use_deterministic_algorithms(previous)
    return family, manifest


def _train_from(family: Family, manifest: Manifest, cfg: TrainConfig, out: Path, x: torch.Tensor,
                y: torch.Tensor, resume: bool, progress: bool, rank: int, world: int) -> None:
    """The epochs left, pausing once to split shared coefficients (a no-op for generators sharing none)."""
    from npas_serve.search import unshare_coefficients, unshare_epoch

    torch.manual_seed(cfg.seed)
    model: nn.Module = family
    if world > 1:
        model = nn.parallel.DistributedDataParallel(sync_batchnorm(family))
    optimizer = make_optimizer(family, cfg)
    start, losses = (load_train_state(out, optimizer) if resume else (0, []))

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        if rank == 0:
            save_checkpoint(out, family, manifest)
            save_train_state(out, optimizer, epoch, cfg, losses)

    split_at = unshare_epoch(cfg)
    for end in ([split_at] if 0 < split_at < cfg.epochs and start <= split_at else []) + [cfg.epochs]:
        train_epochs(family, model, optimizer, x, y, cfg, start, on_epoch, progress, rank, world, end)
        start = end
        if end == split_at:
            # the checkpoint of this epoch is from before the split, so a resume from it splits again
            grown = unshare_coefficients(family, manifest.spec, x, y, cfg)
            follow_grown_parameters(optimizer, grown)
            if grown and world > 1:
                model = nn.parallel.DistributedDataParallel(family)   # parameters changed shape


def follow_grown_parameters(optimizer: torch.optim.Optimizer, grown: dict[nn.Parameter, torch.Tensor]) -> None:
    """Per-parameter optimiser state (moments) of a parameter whose rows were copied: copy it alike."""
    for param, rows in grown.items():
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                state[key] = value.index_select(0, rows.to(value.device))


def _check_shapes(family: Family, x: torch.Tensor, dataset: Dataset) -> None:
    """Fail before training, with a clear message, when the data does not fit the family."""
    try:
        with torch.no_grad():
            family.eval()
            family(x[:2])
            family.train()
    except RuntimeError as err:
        raise UserError(f"data '{dataset.name}' with examples of shape {dataset.input_shape} does not fit "
                        f"this family: {str(err).splitlines()[0]}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m npas_serve.train`: the `train` subcommand, DDP-aware under torchrun."""
    from npas_serve.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
