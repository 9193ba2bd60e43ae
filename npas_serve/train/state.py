"""The optimiser's state between epochs, in safetensors beside the checkpoint, for --resume.

The moments travel in safetensors, never in a pickle; the settings and losses in JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from npas_serve.checkpoint import load_tensors, save_tensors, write_json
from npas_serve.errors import UserError
from npas_serve.train.config import TrainConfig

TRAIN_STATE = "train_state.safetensors"
TRAIN_META = "train_state.json"


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig,
                     losses: list[float]) -> None:
    state = optimizer.state_dict()
    tensors = {f"state.{idx}.{k}": v for idx, s in state["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    sha = save_tensors(directory / TRAIN_STATE, tensors)
    write_json(directory / TRAIN_META, {"epoch": epoch, "config": asdict(cfg), "losses": losses,
                                        "param_groups": state["param_groups"], "sha256": sha})


def saved_config(directory: Path) -> TrainConfig:
    """The training settings of the run in `directory`, for --resume."""
    path = Path(directory) / TRAIN_META
    if not path.is_file():
        raise UserError(f"{directory} has no {TRAIN_META} to resume from")
    return TrainConfig(**json.loads(path.read_text())["config"])


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    meta = json.loads((directory / TRAIN_META).read_text())
    tensors = load_tensors(directory / TRAIN_STATE, meta["sha256"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["epoch"]), list(meta["losses"])
