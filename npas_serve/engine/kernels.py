"""Which CPU convolution kernels run a step: oneDNN's, or PyTorch's own (im2col and a GEMM), by batch size.

Why: PyTorch runs every CPU convolution of a batch above one example through oneDNN, whose
fixed cost per call (it lays the weight out anew each time, and serving's weights are
generated, never packed once) outweighs its speed on the small batches serving sees. On
the default family, every member at batch 2 took 4.9 ms through oneDNN against 2.2 ms
through PyTorch's own kernels; at batch 8, 5.9 against 3.6; at batch 32 oneDNN won, 9.9
against 11.6 (ad hoc, 2-core Xeon, one thread). With oneDNN off, PyTorch picks NNPACK
from batch 16, slower than either (13 ms at batch 16), so both are switched off together.
Where the two curves cross depends on the machine and the family, so the engine measures
it at load (`choose`): the batch sizes up to which PyTorch's own kernels win.

The switches are process-wide (`torch.backends.mkldnn.enabled`, NNPACK's flag), so a step
sets them around its own call and puts them back after it: the device thread is the one
thread of an engine that runs convolutions, and code beside it (a benchmark's pre-built
members on the main thread) sees torch's defaults. Two engines in one process may see each
other's choice mid-step: a slower kernel, never a different answer (both compute the same
convolution, to float rounding).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

SIZES = (2, 4, 8, 16, 32, 64)     # batch sizes `choose` tries, in order, while PyTorch's own kernels win
REPEATS = 3


@dataclass(frozen=True)
class ConvKernels:
    direct_up_to: int = 1        # batches of at most this many examples skip oneDNN (at 1 PyTorch skips it too)

    @contextmanager
    def used_for(self, batch: int) -> Iterator[None]:
        """PyTorch's own kernels for a batch of `batch` examples if they win there, else torch's choice."""
        if batch > self.direct_up_to or batch == 1:
            yield
            return
        mkldnn = torch.backends.mkldnn.enabled
        nnpack, = torch.backends.nnpack.set_flags(False)
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = mkldnn
            torch.backends.nnpack.set_flags(nnpack)


def choose(seconds: Callable[[ConvKernels, int], float], device: torch.device,
           sizes: Sequence[int] = SIZES) -> ConvKernels:
    """`seconds(kernels, batch)` times the family's work at `batch` with `kernels`; PyTorch's own kernels
    are kept up to the last size in `sizes` at which they beat oneDNN (best of REPEATS, interleaved),
    stopping at the first size where they do not. Only CPUs with oneDNN have a choice."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return ConvKernels()
    chosen = ConvKernels()
    for size in sizes:
        direct, onednn = ConvKernels(size), ConvKernels(0)
        times = {direct: [], onednn: []}
        for _ in range(REPEATS):
            for kernels in times:
                times[kernels].append(seconds(kernels, size))
        if min(times[direct]) >= min(times[onednn]):
            break
        chosen = direct
    return chosen
