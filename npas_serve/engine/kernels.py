"""The convolution kernel a round runs on, chosen by its batch size.

PyTorch runs a small CPU convolution on its native kernel at batch 1 and on oneDNN from batch
2 on. oneDNN's fixed cost per call is large for the tensors serving sees: one member of the
default family took 1.47 ms at batch 1, 3.87 ms at batch 2 and 4.25 ms at batch 4 on oneDNN,
against 2.20 and 3.57 ms on the native kernel, which falls behind from about batch 6. Rounds
of a few requests are what a server under moderate load runs, so below the batch where oneDNN
starts to win a round runs with it switched off. That batch depends on the family and the
machine: the engine measures it at load (`onednn_from`).

Both kernels compute the same convolution; answers agree to float rounding, as they already did
between batch 1 and batch 2. The switch is PyTorch's process-wide `torch.backends.mkldnn.enabled`,
set around a stage and restored after it.
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

CANDIDATES = (2, 3, 4, 6, 8, 12, 16)    # batches tried at load; NNPACK takes over native from 16
REPS = 3


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off for what runs inside; the setting before is restored after."""
    before = torch.backends.mkldnn.enabled
    if before == enabled:
        yield
        return
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def onednn_from(time_ms: Callable[[int], float], batches: Sequence[int] = CANDIDATES, reps: int = REPS) -> int:
    """The smallest batch of `batches` at which oneDNN is as fast as the native kernel (the median
    of `reps` interleaved timings each); the last batch if it never is. `time_ms(batch)` runs a
    round at that batch and returns its milliseconds. 1 (oneDNN always, PyTorch's own choice) where
    oneDNN is not built in."""
    if not torch.backends.mkldnn.is_available():
        return 1
    for batch in batches[:-1]:
        on, off = [], []
        for enabled in (True, False):          # untimed: a trace's first call at a new batch size
            with onednn(enabled):
                time_ms(batch)
        for _ in range(reps):
            with onednn(True):
                on.append(time_ms(batch))
            with onednn(False):
                off.append(time_ms(batch))
        if statistics.median(on) <= statistics.median(off):
            return batch
    return batches[-1]
