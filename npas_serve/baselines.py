"""Efficient-ensemble baselines, 1-D ResNets of M estimators, for comparing a shared bank against.

Each model maps a batch (B, C_in, L) to the logits of every estimator, (M, B, classes),
so it trains on the sum of the estimators' losses and answers with their mean softmax,
as a family does. The backbone is the families' (`families/resnet1d.py`): a stem, basic
blocks of two 3-convolutions with a 1-convolution shortcut where the shape changes,
stages of widths (w, 2w, 4w), global average pooling and a linear head.

- `DeepEnsemble`: M independent networks (Lakshminarayanan et al., 2017).
- `PackedEnsemble`: Packed-Ensembles (Laurent et al., ICLR 2023), with the defaults of
  torch-uncertainty's packed layers: every layer ``alpha`` times wider and split into
  ``M * gamma`` groups, except the first (dense over the input, groups 1) and the last
  (M groups, one per estimator's logits); batch norm over all channels, which is per
  estimator since the groups never mix.
- `BatchEnsemble`: BatchEnsemble (Wen et al., ICLR 2020): one shared weight per layer,
  estimator i uses ``W * outer(s_i, r_i)``, computed as ``((x * r_i) W) * s_i`` plus its own
  bias; ``r`` and ``s`` start at random signs; the batch is repeated once per estimator.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, conv: Callable[..., nn.Module], norm: Callable[[int], nn.Module], cin: int, cout: int,
                 stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1), norm(cout)
        self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), norm(cout)) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _backbone(conv, norm, first_conv, in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
    layers: list[nn.Module] = [first_conv(in_channels, widths[0], 3, 1), norm(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, (width, n) in enumerate(zip(widths, blocks)):
        for b in range(n):
            layers.append(_Block(conv, norm, cin, width, 2 if (i > 0 and b == 0) else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())


def _conv(groups: int = 1, bias: bool = False):
    return lambda cin, cout, k, stride: nn.Conv1d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


class DeepEnsemble(nn.Module):
    def __init__(self, width: int, estimators: int = 3, num_classes: int = 10, in_channels: int = 1,
                 blocks: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.nets = nn.ModuleList(
            nn.Sequential(_backbone(_conv(), nn.BatchNorm1d, _conv(), in_channels, widths, blocks),
                          nn.Linear(widths[-1], num_classes)) for _ in range(estimators))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self.nets])


class PackedEnsemble(nn.Module):
    """`width` is the packed (already alpha-scaled) base width; it must divide by `estimators * gamma`."""

    def __init__(self, width: int, estimators: int = 3, gamma: int = 1, num_classes: int = 10,
                 in_channels: int = 1, blocks: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        groups = estimators * gamma
        if width % groups:
            raise ValueError(f"packed width {width} must divide by estimators x gamma = {groups}")
        widths = (width, 2 * width, 4 * width)
        self.estimators, self.num_classes = estimators, num_classes
        self.body = _backbone(_conv(groups), nn.BatchNorm1d, _conv(1), in_channels, widths, blocks)
        # the last layer: one block of logits per estimator, from that estimator's channels only
        self.head = nn.Conv1d(widths[-1], estimators * num_classes, 1, groups=estimators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(x)[:, :, None])[:, :, 0]
        return logits.view(len(x), self.estimators, self.num_classes).transpose(0, 1)


class _BatchEnsembleConv(nn.Module):
    """A convolution shared by all estimators, each scaling its input channels by r_i and its
    output channels by s_i, with its own bias. The batch holds the estimators' copies one after another."""

    def __init__(self, estimators: int, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride, k // 2, bias=False)
        sign = lambda n: torch.randint(0, 2, (estimators, n)).float() * 2 - 1   # noqa: E731
        self.r, self.s = nn.Parameter(sign(cin)), nn.Parameter(sign(cout))
        self.bias = nn.Parameter(torch.zeros(estimators, cout))
        self.estimators = estimators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per = len(x) // self.estimators
        r = self.r.repeat_interleave(per, dim=0)[:, :, None]
        s = self.s.repeat_interleave(per, dim=0)[:, :, None]
        b = self.bias.repeat_interleave(per, dim=0)[:, :, None]
        return self.conv(x * r) * s + b


class BatchEnsemble(nn.Module):
    def __init__(self, width: int, estimators: int = 3, num_classes: int = 10, in_channels: int = 1,
                 blocks: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        conv = lambda cin, cout, k, stride: _BatchEnsembleConv(estimators, cin, cout, k, stride)  # noqa: E731
        self.body = _backbone(conv, nn.BatchNorm1d, conv, in_channels, widths, blocks)
        self.head = _BatchEnsembleConv(estimators, widths[-1], num_classes, 1, 1)
        self.estimators = estimators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiled = x.repeat(self.estimators, *([1] * (x.dim() - 1)))
        logits = self.head(self.body(tiled)[:, :, None])[:, :, 0]
        return logits.view(self.estimators, len(x), -1)


BASELINES: dict[str, type[nn.Module]] = {"deep-ensemble": DeepEnsemble, "packed-ensembles": PackedEnsemble,
                                         "batchensemble": BatchEnsemble}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sized(name: str, params: int, seed: int = 0, estimators: int = 3, **kwargs) -> nn.Module:
    """The baseline `name` at the largest base width whose parameters do not exceed `params`,
    initialised from `seed`."""
    kind = BASELINES[name]
    step = estimators if kind is PackedEnsemble else 1
    width = step
    while parameter_count(kind(width + step, estimators, **kwargs)) <= params:   # params grow with width
        width += step
    if parameter_count(kind(width, estimators, **kwargs)) > params:
        raise ValueError(f"{name} needs more than {params} parameters even at its narrowest")
    torch.manual_seed(seed)
    return kind(width, estimators, **kwargs)
