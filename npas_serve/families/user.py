"""User families: a builder function in the user's own Python file or module.

`npas-serve train --family path/to/families.py:build_members` (or
`package.module:build_members`) reads that file's source, registers the builder
under a name carrying the source's sha256, and the checkpoint keeps the source
(`CODE_FILE`, its sha256 in the manifest), so servers rebuild the family without
the user's original file. Running that source is running code from a model file,
so a checkpoint that carries code loads only when the caller trusts it
(`checkpoint.load_checkpoint(..., trust_code=True)`, `--trust-code` on the CLI).

The builder is called with the keyword arguments it accepts out of `num_classes`
and `in_channels`, and returns the members: a `BuiltMembers`, a dict of name ->
module, or a list of modules. A module that is not a `Member` becomes a one-exit
member; plain Conv1d/Conv2d/Linear layers (and subclasses) become shared layers,
as in `share()`. The source must stand alone: it may import installed packages,
not files beside it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from npas_serve import registry
from npas_serve.errors import UserError
from npas_serve.family import BuiltMembers, Member, to_members
from npas_serve.layers import SharedConv1d, SharedConv2d, SharedLayer

CODE_FILE = "family_code.py"     # the builder's source, beside the checkpoint's tensors and manifest
PREFIX = "user:"                 # registered names of user families: user:<entry>@<sha256[:12]>
_SOURCES: dict[str, bytes] = {}  # sha256 -> source of every user family registered in this process


@dataclass(frozen=True)
class UserCode:
    """The manifest's record of a family built by user code."""

    entry: str       # the builder function's name in the source
    sha256: str      # of the source bytes; checked before anything of it runs
    origin: str      # the reference the user trained with (for messages only)


def is_reference(family: str) -> bool:
    """`path.py:fn` or `package.module:fn`; registered names hold no colon."""
    return ":" in family and not family.startswith(PREFIX)


def read_reference(reference: str) -> tuple[bytes, UserCode]:
    """The source a reference points at, without running any of it."""
    target, _, entry = reference.rpartition(":")
    if not target or not entry.isidentifier():
        raise UserError(f"--family {reference!r}: expected path/to/file.py:function or package.module:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"--family {reference!r}: {path} does not exist")
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError) as err:
            raise UserError(f"--family {reference!r}: cannot find module {target!r} ({err})") from None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise UserError(f"--family {reference!r}: module {target!r} is not an importable .py file")
        path = Path(found.origin)
    source = path.read_bytes()
    return source, UserCode(entry, hashlib.sha256(source).hexdigest(), reference)


def family_name(code: UserCode) -> str:
    return f"{PREFIX}{code.entry}@{code.sha256[:12]}"


def register_code(source: bytes, code: UserCode, filename: str = CODE_FILE) -> str:
    """Check the source against its sha256, run it, and register its builder; returns the family name.

    This runs the user's code: callers decide that it is trusted first.
    """
    actual = hashlib.sha256(source).hexdigest()
    if actual != code.sha256:
        raise UserError(f"{filename} has sha256 {actual[:12]}…, the manifest expects {code.sha256[:12]}…: "
                        "the family's code was changed or belongs to another checkpoint")
    name = family_name(code)
    if name in registry.names("family"):
        return name
    module = types.ModuleType(f"npas_user_family_{code.sha256[:12]}")
    module.__file__ = filename
    sys.modules[module.__name__] = module    # dataclasses and pickling in the user's code look it up
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except Exception as err:
        sys.modules.pop(module.__name__, None)
        raise UserError(f"{code.origin}: running the family's code failed: {type(err).__name__}: {err}") from None
    builder = getattr(module, code.entry, None)
    if not callable(builder):
        raise UserError(f"{code.origin}: the code defines no function {code.entry!r}")
    registry.register("family", name, user_code=True)(_members_from(builder, code.origin))
    _SOURCES[code.sha256] = source
    return name


def source_of(code: UserCode) -> bytes:
    """The source of a user family registered in this process (to write beside a checkpoint)."""
    try:
        return _SOURCES[code.sha256]
    except KeyError:
        raise UserError(f"the code of {code.origin} (sha256 {code.sha256[:12]}…) was never loaded") from None


def _members_from(builder: Callable[..., Any], origin: str) -> Callable[..., BuiltMembers]:
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    def build(**kwargs: Any) -> BuiltMembers:
        built = builder(**{k: v for k, v in kwargs.items() if takes_any or k in accepted})
        if isinstance(built, BuiltMembers):
            names, models = list(built.names), list(built.members)
        elif isinstance(built, dict):
            names, models = [str(k) for k in built], list(built.values())
        elif isinstance(built, (list, tuple)):
            names, models = [f"m{i}" for i in range(len(built))], list(built)
        else:
            raise UserError(f"{origin} returned {type(built).__name__}; return BuiltMembers, a dict of "
                            "name -> nn.Module, or a list of nn.Modules")
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise UserError(f"{origin} must return at least one nn.Module, and only modules")
        members, _ = to_members(models, names)
        return BuiltMembers(names, members)

    return build


def input_ndim(members: list[Member]) -> int | None:
    """Spatial dimensions the members' first layer takes (1: Conv1d, 2: Conv2d); None: a Linear first."""
    for module in members[0].stages[0].modules():
        if isinstance(module, SharedLayer):
            return 1 if isinstance(module, SharedConv1d) else 2 if isinstance(module, SharedConv2d) else None
    return None
