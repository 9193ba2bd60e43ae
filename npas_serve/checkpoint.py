"""Checkpoints: every tensor in safetensors, everything else in a JSON manifest.

Loading never unpickles: the tensor file is hashed and compared with the
manifest's sha256 before it is parsed, and the family is rebuilt from the
manifest's spec through the registry, so a model file cannot carry code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from npas_serve.data.base import Normalisation
from npas_serve.errors import UserError
from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.files import write_atomic

FORMAT = "npas-serve/1"
TENSORS = "model.safetensors"
MANIFEST = "manifest.json"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")   # a pickle protocol byte, or torch.save's zip


@dataclass
class Manifest:
    spec: FamilySpec
    member_names: list[str]
    num_exits: int
    input_shape: list[int]
    num_classes: int
    normalisation: Normalisation
    budget_params: int
    data: str
    sha256: str = ""
    report: dict[str, Any] | None = None    # evaluation summary, written by `npas-serve eval`
    format: str = FORMAT

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
        missing = names - set(d) - {"report", "sha256", "format"}
        if missing:
            raise UserError(f"manifest lacks {sorted(missing)}")
        try:
            d = {k: v for k, v in d.items() if k in names}
            d["spec"] = FamilySpec.from_dict(d["spec"])   # reads manifests of older versions too
            d["normalisation"] = Normalisation(**d["normalisation"])
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


def save_checkpoint(directory: Path, family: Family, manifest: Manifest) -> Manifest:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest.sha256 = save_tensors(directory / TENSORS, family.state_dict())
    write_json(directory / MANIFEST, manifest.to_dict())
    return manifest


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    if directory.is_file():
        raise UserError(f"{directory} is a file; a checkpoint is a directory holding {TENSORS} and {MANIFEST}"
                        + (" (pickled checkpoints are refused)" if _looks_pickled(directory) else ""))
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not a checkpoint: {MANIFEST} is missing")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def load_tensors(path: Path, sha256: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing")
    if _looks_pickled(path):
        raise UserError(f"{path} is a pickle, not safetensors; pickled model files are refused")
    actual = sha256_file(path)
    if actual != sha256:
        raise UserError(f"{path} has sha256 {actual[:12]}…, the manifest expects {sha256[:12]}…: "
                        "the tensor file was changed or belongs to another checkpoint")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:   # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a valid safetensors file: {err}") from None


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[Family, Manifest]:
    """Rebuild the family from its manifest, then load (and verify) its tensors."""
    directory = Path(directory)
    manifest = read_manifest(directory)
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


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors opens with its header length (u64, little-endian) and then the header's "{";
    # that length's low byte is 0x80 for one file in 32, so recognise safetensors first
    if head[8:9] == b"{":
        return False
    return head[:1] == _PICKLE_MAGIC[0] or head[:4] == _PICKLE_MAGIC[1]
