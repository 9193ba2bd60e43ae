"""One registry for every pluggable piece: generators, groupings, families, datasets.

Adding a piece is one file and one decorator, the way timm registers models:

    @register_family("mnist1d-resnet")
    def mnist1d_resnet(num_classes=10, in_channels=1): ...

Builders (`create`) drop ``None`` keyword arguments so the entrypoint's own
defaults apply, and fail with the list of known names.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from npas_serve.errors import UserError

KINDS = ("generator", "grouping", "family", "dataset")
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


class UnknownNameError(UserError):
    """A name that no registered piece answers to."""


def register(kind: str, name: str, **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` under `name`; `meta` describes it (a family's default data and input rank,
    whether a grouping trains), for callers to read with `meta(kind, name)`."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice")
        fn.registry_meta = dict(meta)
        _REGISTRY[kind][name] = fn
        return fn

    return decorator


def register_generator(name: str, **meta: Any):
    return register("generator", name, **meta)


def register_grouping(name: str, **meta: Any):
    return register("grouping", name, **meta)


def register_family(name: str, **meta: Any):
    return register("family", name, **meta)


def register_dataset(name: str, **meta: Any):
    return register("dataset", name, **meta)


def names(kind: str, pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY[kind] if fnmatch.fnmatch(n, pattern))


def lookup(kind: str, name: str) -> Callable[..., Any]:
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(names(kind))}") from None


def meta(kind: str, name: str) -> dict[str, Any]:
    """A copy of what `name` was registered with, so callers cannot change it."""
    return dict(lookup(kind, name).registry_meta)


def create(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    return lookup(kind, name)(*args, **{k: v for k, v in kwargs.items() if v is not None})
