"""Checkpoints: every tensor in safetensors, everything else in a JSON manifest.

Loading never unpickles: the tensor file is hashed and compared with the
manifest's sha256 before it is parsed, and the family is rebuilt from the
manifest's spec through the registry. The one exception is a user family
(`families/user.py`): its builder's source travels with the checkpoint, and
loading runs it, so such a checkpoint loads only with `trust_code=True`
(`--trust-code`); without it nothing of the code is read or run.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from npas_serve.data.base import Normalisation, ValidationSplit
from npas_serve.errors import UserError
from npas_serve.families.user import CODE_FILE, UserCode, family_name, read_reference, register_code, source_of
from npas_serve.family import SHARED, Family, FamilySpec, build_family
from npas_serve.files import write_atomic, write_dir_atomic

FORMAT = "npas-serve/1"
TENSORS = "model.safetensors"
MANIFEST = "manifest.json"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")   # a pickle protocol byte, or torch.save's zip


@dataclass
class Manifest:
    spec: FamilySpec
    member_names: list[str]
    num_exits: int
    input_shape: list[int]                  # what the family's first stage takes, e.g. [1, 40]
    num_classes: int
    normalisation: Normalisation
    budget_params: int
    data: str
    sha256: str = ""
    report: dict[str, Any] | None = None    # evaluation summary, written by `npas-serve eval`
    format: str = FORMAT
    example_shape: list[int] | None = None  # one example as the data holds it (and clients send it), e.g. [40];
                                            # None (older manifests): input_shape
    code: UserCode | None = None            # a user family's builder, its source in CODE_FILE
    validation: ValidationSplit | None = None   # the training examples held out (None: older manifests)
    search: dict[str, Any] | None = None    # a searched grouping's diagnostics (cosines, merges, K per bank)

    @property
    def request_shapes(self) -> list[tuple[int, ...]]:
        """The example shapes a server accepts, the data's own first; each reshapes to `input_shape`
        (they differ only by the channel axis of size 1 that the family adds)."""
        shapes = [tuple(self.example_shape or self.input_shape), tuple(self.input_shape)]
        if len(self.input_shape) > 1 and self.input_shape[0] == 1:
            shapes.append(tuple(self.input_shape[1:]))
        return list(dict.fromkeys(shapes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"manifest format is {d.get('format') if isinstance(d, dict) else d!r}, "
                            f"expected {FORMAT!r}")
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"report", "sha256", "format", "example_shape", "code", "validation", "search"}
        if missing:
            raise UserError(f"manifest lacks {sorted(missing)}")
        try:
            d = {k: v for k, v in d.items() if k in names}
            d["spec"] = FamilySpec.from_dict(d["spec"])   # reads manifests of older versions too
            d["normalisation"] = Normalisation(**d["normalisation"])
            if d.get("code") is not None:
                d["code"] = UserCode(**d["code"])
            if d.get("validation") is not None:
                d["validation"] = ValidationSplit(**d["validation"])
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise UserError(f"manifest is malformed: {err}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    write_atomic(path, dump)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Save tensors (contiguous, on CPU) and return the file's sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp))
    return sha256_file(path)


def save_checkpoint(directory: Path, family: Family, manifest: Manifest,
                    also: Callable[[Path], None] | None = None) -> Manifest:
    """Write the checkpoint into a new directory that replaces `directory` as a whole, so an
    interruption leaves the previous checkpoint or this one, never tensors without their manifest.
    `also(dir)` writes more files into the same new directory (the training state, for --resume)."""
    def fill(tmp: Path) -> None:
        if manifest.code is not None:       # the builder's source travels with the tensors
            source = source_of(manifest.code)
            write_atomic(tmp / CODE_FILE, lambda path: Path(path).write_bytes(source))
        manifest.sha256 = save_tensors(tmp / TENSORS, family.state_dict())
        write_json(tmp / MANIFEST, manifest.to_dict())
        if also is not None:
            also(tmp)

    write_dir_atomic(Path(directory), fill)
    return manifest


def save(family: Family, directory: Path, manifest: Manifest, builder: str | None = None) -> Manifest:
    """Write a family trained from Python (`npas_serve.train.fit` returns `manifest`) as a checkpoint
    that `Engine.load`, `npas-serve serve` and `archive` take.

    A family made by `share()` has no registered builder to rebuild it from when loaded: give
    `builder` ("path/to/file.py:function" or "package.module:function"), a function returning the
    same models. Its source is stored with the checkpoint, so loading needs `trust_code=True`.
    """
    spec, code = manifest.spec, manifest.code
    if spec.family == SHARED:
        if builder is None:
            raise UserError("a family made by share() is rebuilt from code when loaded: pass "
                            "builder='path/to/file.py:function' (a function returning the same models)")
        source, code = read_reference(builder)
        spec = replace(spec, family=register_code(source, code, code.origin))
        rebuilt = build_family(spec)
        ours = {k: tuple(v.shape) for k, v in family.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if ours != theirs or rebuilt.names != family.names:
            differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise UserError(f"{builder} builds members {rebuilt.names} that differ from the family's "
                            f"{family.names} (first differences: {differ})")
    return save_checkpoint(directory, family, replace(manifest, spec=spec, code=code))


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    if directory.is_file():
        raise UserError(f"{directory} is a file; a checkpoint is a directory holding {TENSORS} and {MANIFEST}"
                        + (" (pickled checkpoints are refused)" if _looks_pickled(directory) else ""))
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not a checkpoint: {MANIFEST} is missing")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    check_manifest(manifest, directory / TENSORS)
    return manifest


def load_tensors(path: Path, sha256: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing")
    _refuse_pickle(path)
    actual = sha256_file(path)
    if actual != sha256:
        raise UserError(f"{path} has sha256 {actual[:12]}…, the manifest expects {sha256[:12]}…: "
                        "the tensor file was changed or belongs to another checkpoint")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:   # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a valid safetensors file: {err}") from None


class UntrustedCodeError(UserError):
    """A checkpoint carries code and the caller did not say it trusts it."""


def trust_hint(directory: Path, code: UserCode) -> str:
    return (f"{directory} carries Python code ({CODE_FILE}: {code.entry} from {code.origin}, sha256 "
            f"{code.sha256[:12]}…) that loading would run; if you trust it, pass --trust-code "
            "(trust_code=True from Python; for TorchServe, build the .mar with `npas-serve archive --trust-code`)")


def load_code(directory: Path, manifest: Manifest, trust_code: bool = False) -> None:
    """Register a user family's builder from the checkpoint's own copy of its source; runs it, so
    refuses unless `trust_code`. A built-in family needs nothing here."""
    if manifest.code is None:
        return
    if not trust_code:
        raise UntrustedCodeError(trust_hint(directory, manifest.code))
    if manifest.spec.family != family_name(manifest.code):
        raise UserError(f"manifest's family {manifest.spec.family!r} is not the one its code registers "
                        f"({family_name(manifest.code)!r})")
    path = Path(directory) / CODE_FILE
    if not path.is_file():
        raise UserError(f"{directory} lacks {CODE_FILE}, the code of its family {manifest.code.origin}")
    register_code(path.read_bytes(), manifest.code, str(path))


def load_checkpoint(directory: Path, device: str | torch.device = "cpu",
                    trust_code: bool = False) -> tuple[Family, Manifest]:
    """Rebuild the family from its manifest, then load (and verify) its tensors.

    A checkpoint of a user family runs that family's code, so it loads only with `trust_code`.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    load_code(directory, manifest, trust_code)
    try:
        family = build_family(manifest.spec)
    except (ValueError, TypeError) as err:   # UserError, or a spec whose parts do not fit together
        raise UserError(f"manifest describes a family that cannot be built: {err}") from None
    tensors = load_tensors(directory / TENSORS, manifest.sha256, device)
    expected = family.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {keys[:3]}{'…' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if keys)
        raise UserError(f"tensors in {directory} do not match the manifest's family "
                        f"'{manifest.spec.family}' ({detail})")
    family.load_state_dict(tensors)
    if family.names != manifest.member_names:
        raise UserError(f"manifest members {manifest.member_names} differ from the family's {family.names}")
    return family.to(device).eval(), manifest


def _refuse_pickle(path: Path) -> None:
    if _looks_pickled(path):
        raise UserError(f"{path} is a pickle, not safetensors; pickled model files are refused")


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors opens with its header length (u64, little-endian) and then the header's "{";
    # that length's low byte is 0x80 for one file in 32, so recognise safetensors first
    if head[8:9] == b"{":
        return False
    return head[:1] == _PICKLE_MAGIC[0] or head[:4] == _PICKLE_MAGIC[1]


# -- manifest bounds: checked before anything is allocated from the manifest's numbers ----------

MAX_INPUT_ELEMENTS = 1 << 20     # values in one example
MAX_INPUT_DIMS = 4
MAX_MEMBERS = 256
MAX_EXITS = 64


def check_manifest(manifest: Manifest, tensors: Path) -> None:
    """Refuse a manifest whose numbers cannot describe the tensor file beside it.

    Building the family allocates what the manifest describes before the tensors are read,
    so every size is bounded first: the bank and each class of every member's head hold at
    least one float32 in the (unread) tensor file, whose size alone is known.
    """
    m = manifest
    if not tensors.is_file():
        raise UserError(f"{tensors} is missing")
    _refuse_pickle(tensors)                     # before its size is taken as the bound
    file_bytes = tensors.stat().st_size
    if not (isinstance(m.input_shape, list) and 1 <= len(m.input_shape) <= MAX_INPUT_DIMS
            and all(_count(d) for d in m.input_shape) and math.prod(m.input_shape) <= MAX_INPUT_ELEMENTS):
        raise UserError(f"manifest input_shape {m.input_shape!r} must be 1 to {MAX_INPUT_DIMS} positive integers "
                        f"with at most {MAX_INPUT_ELEMENTS} values in all")
    if not (isinstance(m.member_names, list) and 1 <= len(m.member_names) <= MAX_MEMBERS
            and all(isinstance(n, str) and n for n in m.member_names)
            and len(set(m.member_names)) == len(m.member_names)):
        raise UserError(f"manifest member_names must be 1 to {MAX_MEMBERS} distinct names")
    if not (_count(m.num_exits) and m.num_exits <= MAX_EXITS):
        raise UserError(f"manifest num_exits {m.num_exits!r} must be an integer from 1 to {MAX_EXITS}")
    heads = len(m.member_names) * 4          # bytes per class: one float32 weight in each member's head
    kwargs = m.spec.family_kwargs if isinstance(m.spec.family_kwargs, dict) else {}
    for name, value in (("num_classes", m.num_classes), ("spec num_classes", kwargs.get("num_classes", 2))):
        if not (_count(value) and value >= 2 and value * heads <= max(file_bytes, heads * 2)):
            raise UserError(f"manifest {name} {value!r} must be an integer of at least 2 that the tensor "
                            f"file ({file_bytes} bytes) can hold heads for")
    for name, value in (("budget_params", m.budget_params), ("spec budget_params", m.spec.budget_params),
                        ("spec in_channels", kwargs.get("in_channels"))):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 <= value and value * 4 <= file_bytes):
            raise UserError(f"manifest {name} {value!r} is more than the tensor file ({file_bytes} bytes) holds")
    n = m.normalisation
    if not (_finite(n.mean) and _finite(n.std) and n.std > 0):
        raise UserError(f"manifest normalisation (mean {n.mean!r}, std {n.std!r}) needs a finite mean and a "
                        "finite std above 0")
    if m.report is not None:
        _check_report(m.report, m.member_names, m.num_exits)


def _check_report(report: Any, names: list[str], num_exits: int) -> None:
    """The parts of an evaluation report the planner reads: a score for every member's every exit."""
    def bad(why: str) -> UserError:
        return UserError(f"manifest report is malformed: {why}; run `npas-serve eval` again")

    if not isinstance(report, dict):
        raise bad("not an object")
    for key, kind in (("data", str), ("num_test", int), ("member_order", list), ("exits", list),
                      ("ensembles", list), ("params", dict)):
        if not isinstance(report.get(key), kind):
            raise bad(f"{key} is not a {kind.__name__}")
    if sorted(report["member_order"]) != sorted(names):
        raise bad(f"member_order {report['member_order']!r:.80} is not an order of {names}")
    seen = set()
    for e in report["exits"]:
        if not (isinstance(e, dict) and e.get("member") in names and _count(e.get("exit"), 0)
                and e["exit"] < num_exits and all(_finite(e.get(k)) for k in ("accuracy", "nll", "ece"))
                and 0 <= e["accuracy"] <= 1):
            raise bad(f"exit score {e!r:.80} does not name a member, an exit and finite scores")
        seen.add((e["member"], e["exit"]))
    missing = [(n, x) for n in names for x in range(num_exits) if (n, x) not in seen]
    if missing:
        raise bad(f"no score for {missing[:3]}")
    if not all(isinstance(e, dict) for e in report["ensembles"]):
        raise bad("ensembles holds something other than scores")


def _count(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
