"""Layers whose weight comes from a shared bank instead of a parameter of their own.

A shared layer knows only the shape it needs. `Family` generates the weights of
a member's stage and binds them (`layer.weight = tensor`) just before the stage
runs, then unbinds them, so outside a forward pass no generated weight is held.
Biases, when present, stay private to the layer, like norms and heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedLayer(nn.Module):
    """Base for layers that draw their weight from a generator."""

    weight_shape: tuple[int, ...]

    def __init__(self, weight_shape: tuple[int, ...], out_features: int, bias: bool):
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.weight: torch.Tensor | None = None  # bound by Family for the duration of a stage
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _bound_weight(self) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(
                f"{type(self).__name__} ran without a bound weight; run it through Family, "
                "or call Family.freeze() for a plain module"
            )
        return self.weight

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, bias={self.bias is not None}"


class _SharedConv(SharedLayer):
    _conv = staticmethod(F.conv1d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False):
        dims = 1 if self._conv is F.conv1d else 2
        kernel = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        super().__init__((out_channels, in_channels // groups, *kernel), out_channels, bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self._bound_weight(), self.bias, self.stride, self.padding,
                          self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Module) -> "_SharedConv":
        """Same geometry as `conv`; its weight values are not copied (the bank makes them)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot share {conv}: only numeric zero padding is supported")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, bias=conv.bias is not None)


class SharedConv1d(_SharedConv):
    _conv = staticmethod(F.conv1d)


class SharedConv2d(_SharedConv):
    _conv = staticmethod(F.conv2d)


class SharedLinear(SharedLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__((out_features, in_features), out_features, bias)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._bound_weight(), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SharedLinear":
        """Same geometry as `linear`; its weight values are not copied (the bank makes them)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None)


_CONVERTERS = {
    nn.Conv1d: SharedConv1d.from_conv,
    nn.Conv2d: SharedConv2d.from_conv,
    nn.Linear: SharedLinear.from_linear,
}


def to_shared(module: nn.Module) -> SharedLayer | None:
    """The shared twin of a Conv1d/Conv2d/Linear or of a subclass of one, or None for any other module.

    A subclass's own `forward` is not kept: the twin runs the plain convolution or product.
    """
    for kind, convert in _CONVERTERS.items():
        if isinstance(module, kind):
            return convert(module)
    return None


def to_plain(layer: SharedLayer, weight: torch.Tensor) -> nn.Module:
    """A plain torch layer holding `weight` as its own parameter (used to freeze a member)."""
    if isinstance(layer, SharedLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        cls = nn.Conv1d if isinstance(layer, SharedConv1d) else nn.Conv2d
        plain = cls(layer.in_channels, layer.out_channels, layer.weight_shape[2:], layer.stride,
                    layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None)
    plain = plain.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain
