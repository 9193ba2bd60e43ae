"""The settings of a training run, with every default that depends on the run resolved here."""
from __future__ import annotations

import math
from dataclasses import dataclass

from npas_serve.errors import UserError


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "adamw"        # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-2      # never applied to coefficients, norms or biases
    momentum: float = 0.9           # sgd only (Nesterov)
    schedule: str = "cosine"        # cosine | step | constant, applied per step
    exit_weights: list[float] | None = None   # None: (e + 1) / E, the last exit weighs most
    seed: int = 0
    search_epochs: int | None = None  # warm-up of a searched grouping; None: see `warm_up_epochs`
    unshare_epoch: int | None = None  # split shared coefficients after it; None: see `split_epoch`; 0: never
    validation: float = 0.1           # fraction of the training examples held out, drawn with `seed`

    def checks(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise UserError(f"need epochs >= 1 and batch size >= 2, got {self.epochs} and {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; known: adamw, sgd")
        if self.schedule not in ("cosine", "step", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}; known: cosine, step, constant")
        if not 0 < self.validation < 1:
            raise UserError(f"the validation fraction must lie in (0, 1), got {self.validation}")
        if not (self.lr > 0) or self.weight_decay < 0:
            raise UserError(f"need lr > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        if min(self.search_epochs or 1, 1 if self.unshare_epoch is None else self.unshare_epoch + 1) < 1:
            raise UserError(f"need search epochs >= 1 and unshare epoch >= 0, "
                            f"got {self.search_epochs} and {self.unshare_epoch}")

    # Our schedules are short (8-60 epochs, not the reference's 200), so the search's epoch
    # counts scale with the run: see docs/methods.md#gradient-grouping-search.
    def warm_up_epochs(self) -> int:
        """Epochs of a searched grouping's warm-up: at least 10% of the run (reference 20/200), at
        least 2, so the gradients come from a network past its first-epoch transient."""
        return self.search_epochs if self.search_epochs is not None else max(2, math.ceil(0.1 * self.epochs))

    def split_epoch(self) -> int:
        """The epoch after which shared coefficients are split: 5% of the run (reference 10/200),
        at least 1; 0 never."""
        return self.unshare_epoch if self.unshare_epoch is not None else max(1, round(0.05 * self.epochs))

    def exit_weights_for(self, num_exits: int) -> list[float]:
        """Each exit's weight in the loss."""
        if self.exit_weights is None:
            return [(e + 1) / num_exits for e in range(num_exits)]
        if len(self.exit_weights) != num_exits or min(self.exit_weights) < 0:
            raise UserError(f"need {num_exits} non-negative exit weights, got {self.exit_weights}")
        return list(self.exit_weights)
