"""The convolution kernels a step runs with (engine/kernels.py): chosen by measurement, switched only
around the step, and the same answers either way."""
from __future__ import annotations

import pytest
import torch

from npas_serve.engine.kernels import ConvKernels, choose

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@needs_onednn
def test_choose_keeps_pytorchs_kernels_up_to_the_last_size_where_they_win():
    # PyTorch's own kernels win at 2, 4 and 8, lose at 16, and would win again at 32: the choice stops at 16
    direct_wins = {2: True, 4: True, 8: True, 16: False, 32: True}
    asked = []

    def seconds(kernels: ConvKernels, batch: int) -> float:
        asked.append(batch)
        direct = kernels.direct_up_to >= batch
        return 1.0 if direct == direct_wins[batch] else 2.0

    assert choose(seconds, CPU, sizes=(2, 4, 8, 16, 32)) == ConvKernels(8)
    assert 32 not in asked


@needs_onednn
def test_choose_keeps_torchs_choice_when_onednn_wins_at_once():
    assert choose(lambda kernels, batch: 2.0 if kernels.direct_up_to >= batch else 1.0, CPU) == ConvKernels()


def test_only_a_cpu_has_a_choice():
    assert choose(lambda kernels, batch: pytest.fail("nothing to time"), torch.device("meta")) == ConvKernels()


@needs_onednn
def test_the_switch_holds_for_the_step_alone_and_is_put_back_after_a_failure():
    before = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    kernels = ConvKernels(8)
    with kernels.used_for(32):
        assert torch.backends.mkldnn.enabled == before[0]
    with pytest.raises(RuntimeError):
        with kernels.used_for(8):
            assert not torch.backends.mkldnn.enabled and not torch._C._get_nnpack_enabled()
            raise RuntimeError("a step that fails")
    assert (torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()) == before


@needs_onednn
def test_both_kernels_compute_the_same_convolution():
    conv = torch.nn.Conv1d(16, 32, 3, padding=1).eval()
    x = torch.randn(4, 16, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with ConvKernels(0).used_for(4):
            onednn = conv(x)
        with ConvKernels(4).used_for(4):
            direct = conv(x)
    torch.testing.assert_close(direct, onednn, rtol=1e-5, atol=1e-5)
