"""1-D ResNets for MNIST-1D: members that differ in depth and width, with an exit per stage.

Stage 0 is the stem plus the first blocks; stages 1 and 2 halve the length and
double the width. Each exit head is global average pooling and a linear layer,
private to the member. Convolutions are shared layers: their weights come from
the family's bank.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import BuiltMembers, Member
from npas_serve.layers import SharedConv1d
from npas_serve.registry import register_family


class BasicBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = SharedConv1d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = SharedConv1d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(SharedConv1d(cin, cout, 1, stride), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _head(width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes))


def resnet1d(widths: Sequence[int], blocks: Sequence[int], num_classes: int = 10,
             in_channels: int = 1) -> Member:
    """One member: len(widths) stages, `blocks[i]` basic blocks in stage i."""
    stages, cin = [], widths[0]
    for i, (width, n) in enumerate(zip(widths, blocks)):
        layers: list[nn.Module] = []
        if i == 0:
            layers += [SharedConv1d(in_channels, width, 3, 1, 1), nn.BatchNorm1d(width), nn.ReLU()]
        for b in range(n):
            layers.append(BasicBlock1d(cin, width, 2 if (i > 0 and b == 0) else 1))
            cin = width
        stages.append(nn.Sequential(*layers))
    return Member(stages, [_head(w, num_classes) for w in widths])


def _build(configs: dict[str, tuple[Sequence[int], Sequence[int]]], num_classes: int,
           in_channels: int) -> BuiltMembers:
    return BuiltMembers(list(configs), [resnet1d(w, b, num_classes, in_channels) for w, b in configs.values()])


@register_family("mnist1d-resnet", data="mnist1d", budget=0.85, epochs=60, input_ndim=1)
def mnist1d_resnet(num_classes: int = 10, in_channels: int = 1) -> BuiltMembers:
    """Three deep members that differ in width (32/28/24) and depth (2 or 3 blocks per stage).

    Members of comparable strength are what make a shared-bank ensemble pay: with a
    shallow 1-block member in the family, its errors dominate the mean softmax and the
    ensemble fell below its best member. The bank is 0.85 of the largest member's
    convolutions, which keeps it under the members' unshared total / 3.
    """
    return _build({
        "deep-wide": ((32, 64, 128), (2, 2, 2)),
        "deep-mid": ((28, 56, 112), (2, 2, 2)),
        "deeper-narrow": ((24, 48, 96), (3, 3, 3)),
    }, num_classes, in_channels)


@register_family("mnist1d-resnet-tiny", data="mnist1d", budget=0.5, epochs=12, input_ndim=1)
def mnist1d_resnet_tiny(num_classes: int = 10, in_channels: int = 1) -> BuiltMembers:
    """Three small members: trains in seconds, for tests and CI."""
    return _build({
        "wide": ((24, 48, 96), (1, 1, 1)),
        "mid": ((16, 32, 64), (1, 1, 1)),
        "narrow": ((8, 16, 32), (1, 1, 1)),
    }, num_classes, in_channels)


@register_family("mnist1d-resnet-bench", data="mnist1d", budget=0.25, epochs=40, input_ndim=1)
def mnist1d_resnet_bench(num_classes: int = 10, in_channels: int = 1) -> BuiltMembers:
    """The methods benchmark's family (benchmarks/methods.py): two blocks per stage, so a bin holds
    several layers of one member for the gradient search to choose among, and members of two
    depths (2 and 3 blocks per stage), so some join by position and one by gradient."""
    return _build({
        "wide": ((16, 32, 64), (2, 2, 2)),
        "mid": ((12, 24, 48), (2, 2, 2)),
        "deep": ((12, 24, 48), (3, 3, 3)),
    }, num_classes, in_channels)
