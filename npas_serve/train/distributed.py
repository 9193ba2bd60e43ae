"""Training on several processes: the process group, batch norm over the global batch, the mean loss.

Under torchrun each rank takes an equal slice of every global batch (`loop.batches`),
batch norm normalises with the statistics of the whole global batch (`GlobalBatchNorm`),
and rank 0 alone writes the checkpoint, so K processes train the model one process would:

    torchrun --nproc-per-node 2 -m npas_serve.cli train --out runs/ddp
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1), a gloo process group for the block.

    gloo because training runs on CPU tensors. The group is left only after every rank
    got there, so rank 0 finishes its last checkpoint before the others exit.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def mean_over_ranks(value: float, world: int) -> float:
    """An epoch's loss over the global batches, not rank 0's slices (one collective per epoch)."""
    if world == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world


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
