"""Small 2-D CNNs for scikit-learn's 8x8 digits, with an exit per stage.

Stage 0 works at 8x8, stages 1 and 2 max-pool to 4x4 and 2x2 first. Members
differ in width and in convolutions per stage.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from npas_serve.family import BuiltMembers, Member
from npas_serve.layers import SharedConv2d
from npas_serve.registry import register_family


def cnn2d(widths: Sequence[int], depths: Sequence[int], num_classes: int = 10,
          in_channels: int = 1) -> Member:
    stages, cin = [], in_channels
    for i, (width, depth) in enumerate(zip(widths, depths)):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
        for _ in range(depth):
            layers += [SharedConv2d(cin, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        stages.append(nn.Sequential(*layers))
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes)) for w in widths]
    return Member(stages, heads)


def _build(configs: dict[str, tuple[Sequence[int], Sequence[int]]], num_classes: int,
           in_channels: int) -> BuiltMembers:
    return BuiltMembers(list(configs), [cnn2d(w, d, num_classes, in_channels) for w, d in configs.values()])


@register_family("digits-cnn", data="digits", budget=0.45, epochs=40, input_ndim=2)
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> BuiltMembers:
    return _build({
        "deep-wide": ((32, 64, 128), (2, 2, 2)),
        "shallow-wide": ((32, 64, 128), (1, 1, 1)),
        "shallow-narrow": ((16, 32, 64), (1, 1, 1)),
    }, num_classes, in_channels)


@register_family("digits-cnn-tiny", data="digits", budget=0.5, epochs=15, input_ndim=2)
def digits_cnn_tiny(num_classes: int = 10, in_channels: int = 1) -> BuiltMembers:
    """digits-cnn at half width: trains in seconds, for tests and benchmarks."""
    return _build({
        "deep-wide": ((16, 32, 64), (2, 2, 2)),
        "shallow-wide": ((16, 32, 64), (1, 1, 1)),
        "shallow-narrow": ((8, 16, 32), (1, 1, 1)),
    }, num_classes, in_channels)
