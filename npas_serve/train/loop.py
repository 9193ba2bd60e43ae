"""The training loop: loss, optimiser, learning-rate schedule, batches and epochs of a family.

The loss is the sum over members of their exit-weighted cross-entropies on the
same minibatch, so every member's gradient reaches the shared bank. The shuffle
of epoch e depends only on (seed, e), so a resumed run replays it exactly.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import Family
from npas_serve.train.config import TrainConfig
from npas_serve.train.distributed import mean_over_ranks


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels inside the block (so a run, and a resumed one, is reproducible bit for
    bit on CPU), the caller's setting restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if cfg.schedule == "step":   # x0.2 at 30%, 60% and 80% of training, as the SuperWeights recipe
        return 0.2 ** sum(step >= total * f for f in (0.3, 0.6, 0.8))
    return 1.0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay on weights only: 1-D parameters (norms, biases) and, in a
    family, the generator's coefficients and whatever else it lists get none."""
    no_decay_ids = ({id(p) for p in model.generator.no_decay_parameters()} if isinstance(model, Family) else set())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
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
    """A family's epochs `start_epoch` to `end_epoch` (default: all) of the schedule, on `family_loss`.

    `model` is the family, or its DistributedDataParallel wrapper.
    """
    weights = cfg.exit_weights_for(family.num_exits)
    return fit_epochs(family, lambda xb, yb: family_loss(model(xb), yb, weights), optimizer, x, y, cfg,
                      start_epoch, on_epoch, progress, rank, world, end_epoch)


def fit_epochs(module: nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               start_epoch: int = 0, on_epoch: Callable[[int, float], None] | None = None,
               progress: bool = True, rank: int = 0, world: int = 1, end_epoch: int | None = None) -> list[float]:
    """The loop itself, for any model and loss (a family, or the benchmark's baselines with the same
    recipe): per step the schedule's learning rate, `loss_of(x[batch], y[batch])`, one optimiser
    step; the mean loss of each epoch is returned. `module` is put in train mode, then eval mode."""
    from tqdm import tqdm

    steps_per_epoch = len(batches(len(x), cfg.batch_size, cfg.seed, 0, rank, world))
    total = cfg.epochs * steps_per_epoch
    losses = []
    # a live bar on a terminal; in a log (CI, a pipe) one line per tenth of the run instead
    show = progress and rank == 0
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train", unit="step",
               disable=not (show and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True)
    module.train()
    for epoch in range(start_epoch, cfg.epochs if end_epoch is None else end_epoch):
        running, count = 0.0, 0
        for i, idx in enumerate(batches(len(x), cfg.batch_size, cfg.seed, epoch, rank, world)):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch + i, total)
            loss = loss_of(x[idx], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count = running + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / count:.3f}")
        losses.append(mean_over_ranks(running / max(count, 1), world))
        if show and bar.disable and (epoch + 1) % max(1, cfg.epochs // 10) == 0:
            print(f"train: epoch {epoch + 1}/{cfg.epochs}, loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
    bar.close()
    module.eval()
    return losses
