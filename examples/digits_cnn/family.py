"""A family of your own: three small 2-D CNNs for 8x8 digit images, each with an exit per stage.

`npas-serve train --family examples/digits_cnn/family.py:build_members ...` calls
`build_members`; the checkpoint keeps this file's source, so servers rebuild the
family without it (and run it only with --trust-code). Plain torch layers are
enough: every nn.Conv2d / nn.Linear inside the stages draws its weights from the
family's one shared bank; batch norms and the exit heads stay each member's own.
The file must stand alone: import installed packages only.
"""
from torch import nn

from npas_serve import Member


def cnn(widths, convs_per_stage, num_classes, in_channels):
    """Stages at 8x8, 4x4 and 2x2; after each, an exit head (pool, linear)."""
    stages, cin = [], in_channels
    for i, width in enumerate(widths):
        layers = [nn.MaxPool2d(2)] if i > 0 else []
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        stages.append(nn.Sequential(*layers))
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes)) for w in widths]
    return Member(stages, heads)


def build_members(num_classes=10, in_channels=1):
    """Name -> member, largest first. `num_classes` and `in_channels` come from the data."""
    return {
        "deep": cnn((16, 32, 64), 2, num_classes, in_channels),
        "wide": cnn((24, 48, 96), 1, num_classes, in_channels),
        "narrow": cnn((12, 24, 48), 1, num_classes, in_channels),
    }
