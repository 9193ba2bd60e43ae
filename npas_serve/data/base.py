"""The dataset every family trains on: train/test arrays plus the normalisation the server reuses."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npas_serve.errors import UserError
from npas_serve.files import write_atomic


@dataclass(frozen=True)
class Normalisation:
    """Scalar standardisation fitted on the training split; stored in the manifest for serving."""

    mean: float
    std: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray   # float32 (N, *input_shape), raw (not normalised)
    y_train: np.ndarray   # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def normalisation(self) -> Normalisation:
        std = float(self.x_train.std())
        return Normalisation(float(self.x_train.mean()), std if std > 0 else 1.0)

    def with_channels(self, input_ndim: int) -> "Dataset":
        """Add the channel axis a family expects: (N, L) -> (N, 1, L), (N, H, W) -> (N, 1, H, W)."""
        have = self.x_train.ndim - 1
        if have == input_ndim:
            x_train, x_test = self.x_train[:, None], self.x_test[:, None]
        elif have == input_ndim + 1:
            x_train, x_test = self.x_train, self.x_test
        else:
            raise UserError(
                f"data '{self.name}' has examples of shape {self.input_shape}; this family takes "
                f"{input_ndim}-D signals: (N, {'L' if input_ndim == 1 else 'H, W'}) or (N, C, ...)")
        return Dataset(self.name, x_train, self.y_train, x_test, self.y_test, self.num_classes)

    def shaped_as(self, input_shape: tuple[int, ...] | list[int]) -> "Dataset":
        """The examples in the shape a family's first stage takes: their own, or with the channel
        axis of size 1 that the family adds (for evaluating a checkpoint on its data)."""
        shape = tuple(input_shape)
        if self.input_shape == shape:
            return self
        if (1, *self.input_shape) == shape:
            return Dataset(self.name, self.x_train[:, None], self.y_train, self.x_test[:, None], self.y_test,
                           self.num_classes)
        raise UserError(f"data '{self.name}' has examples of shape {self.input_shape}; the model takes {shape}")


@dataclass(frozen=True)
class ValidationSplit:
    """Which training examples are held out for validation: the first `size` of a permutation of
    the `of` training examples seeded by `seed`. Recorded in the manifest, so evaluation finds
    the same examples again; the test set is used for the report only."""

    fraction: float
    seed: int
    size: int
    of: int

    @classmethod
    def of_data(cls, dataset: "Dataset", fraction: float = 0.1, seed: int = 0) -> "ValidationSplit":
        n = len(dataset.y_train)
        if not 0 < fraction < 1:
            raise UserError(f"the validation fraction must lie in (0, 1), got {fraction}")
        size = max(1, round(fraction * n))
        if n - size < 2:
            raise UserError(f"data '{dataset.name}' has {n} training examples: too few to hold out {fraction:.0%}")
        return cls(fraction, seed, size, n)

    def apply(self, dataset: "Dataset") -> tuple["Dataset", np.ndarray, np.ndarray]:
        """(the dataset without the held-out examples, their inputs, their labels)."""
        if len(dataset.y_train) != self.of:
            raise UserError(f"data '{dataset.name}' has {len(dataset.y_train)} training examples; its validation "
                            f"split was drawn from {self.of}")
        order = np.random.default_rng(self.seed).permutation(self.of)
        held, kept = np.sort(order[: self.size]), np.sort(order[self.size:])
        train = Dataset(dataset.name, dataset.x_train[kept], dataset.y_train[kept], dataset.x_test, dataset.y_test,
                        dataset.num_classes)
        return train, dataset.x_train[held], dataset.y_train[held]


def checked(name: str, x_train, y_train, x_test, y_test, num_classes: int | None = None) -> Dataset:
    """Validate arrays from any source into a Dataset, with errors a user can act on."""
    arrays = {"x": x_train, "y": y_train, "x_test": x_test, "y_test": y_test}
    for key, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype == object or arr.size == 0:
            raise UserError(f"data '{name}': '{key}' must be a non-empty numeric array")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise UserError(f"data '{name}': '{key}' has non-numeric dtype {arr.dtype}")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim < 2:
            raise UserError(f"data '{name}': {split} inputs need shape (N, ...), got {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"data '{name}': {split} labels need shape ({len(x)},), got {y.shape}")
        if not np.all(np.isfinite(x)):
            raise UserError(f"data '{name}': {split} inputs contain NaN or Inf")
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise UserError(f"data '{name}': {split} labels must be integers")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"data '{name}': train examples {x_train.shape[1:]} and test examples "
                        f"{x_test.shape[1:]} differ in shape")
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    classes = num_classes if num_classes is not None else int(max(y_train.max(), y_test.max())) + 1
    for y, split in ((y_train, "train"), (y_test, "test")):
        if y.min() < 0 or y.max() >= classes:
            raise UserError(f"data '{name}': {split} labels must lie in [0, {classes - 1}], "
                            f"found {int(y.min())}..{int(y.max())}")
    if classes < 2:
        raise UserError(f"data '{name}': need at least 2 classes, found {classes}")
    return Dataset(name, x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test, classes)


def cache_dir() -> Path:
    return Path(os.environ.get("NPAS_CACHE", Path.home() / ".cache" / "npas-serve"))


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write next to the target, then rename: a crash never leaves a half-written cache file."""
    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:      # a file object: given a name, np.savez would append .npz
            np.savez(f, **arrays)
    write_atomic(path, dump)
