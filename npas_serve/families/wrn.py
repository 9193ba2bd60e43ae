"""CIFAR-scale wide ResNets (3x32x32 inputs) on one bank, with an exit after each group.

WRN-d-k (Zagoruyko & Komodakis): a 3x3 stem of 16 channels, then three groups of
(d - 4) / 6 pre-activation basic blocks of 16k, 32k and 64k channels, the second
and third group halving the resolution. The SuperWeights paper's ensembles mix
such members (WRN-16-4, WRN-16-2, WRN-10-4); here they share one bank. Stage e is
group e (stage 0 also holds the stem); each exit head is BN-ReLU, global average
pooling and a linear layer, private to its member. This family is what shows how
serving costs grow from the 1-D MNIST families to a model of published size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import BuiltMembers, Member
from npas_serve.layers import SharedConv2d
from npas_serve.registry import register_family


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = SharedConv2d(cin, cout, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = SharedConv2d(cout, cout, 3, 1, 1)
        self.shortcut = SharedConv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


def _head(width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def wide_resnet(depth: int, widen: int, num_classes: int = 10, in_channels: int = 3, base: int = 16) -> Member:
    """WRN-`depth`-`widen` as a three-exit member; `base` 16 is the published stem width."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"a wide ResNet's depth is 6n + 4 with n >= 1, got {depth}")
    blocks = (depth - 4) // 6
    widths = [base * widen, 2 * base * widen, 4 * base * widen]
    stages, cin = [], base
    for g, width in enumerate(widths):
        layers: list[nn.Module] = [SharedConv2d(in_channels, base, 3, 1, 1)] if g == 0 else []
        for b in range(blocks):
            layers.append(WideBlock(cin, width, 2 if (g > 0 and b == 0) else 1))
            cin = width
        stages.append(nn.Sequential(*layers))
    return Member(stages, [_head(w, num_classes) for w in widths])


def _build(configs: dict[str, tuple[int, int]], num_classes: int, in_channels: int, base: int) -> BuiltMembers:
    return BuiltMembers(list(configs), [wide_resnet(d, k, num_classes, in_channels, base) for d, k in configs.values()])


@register_family("cifar-wrn", data="synthetic-cifar", budget=0.5, epochs=30, input_ndim=2)
def cifar_wrn(num_classes: int = 10, in_channels: int = 3) -> BuiltMembers:
    """WRN-16-4, WRN-16-2 and WRN-10-4, as in the SuperWeights paper's CIFAR ensembles.

    The bank is half the largest member's convolutions (WRN-16-4: 2.75M), which keeps it
    under the members' unshared total / 3.
    """
    return _build({"wrn-16-4": (16, 4), "wrn-16-2": (16, 2), "wrn-10-4": (10, 4)}, num_classes, in_channels, 16)


@register_family("cifar-wrn-tiny", data="synthetic-cifar", budget=0.5, epochs=2, input_ndim=2)
def cifar_wrn_tiny(num_classes: int = 10, in_channels: int = 3) -> BuiltMembers:
    """cifar-wrn's three shapes at a quarter of the width (stem 4): trains in seconds, for tests."""
    return _build({"wrn-16-4": (16, 4), "wrn-16-2": (16, 2), "wrn-10-4": (10, 4)}, num_classes, in_channels, 4)
