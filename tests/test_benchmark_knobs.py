"""The knobs that benchmarks/host_overhead.py turns to make the CPU take a CUDA run's LoRA path still steer the
dispatch. They are the dispatch's own (dispatch.py); when they moved there the benchmark went on setting the old
names, and measured the CPU's path for many rounds without saying so."""
import sys
from pathlib import Path

import pytest
import torch

from surgery_plugins.lora import dispatch, kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness
import host_overhead


@pytest.fixture
def cuda_path():
    """host_overhead.take_the_cuda_path(), undone afterwards (its no-op launches forgotten), and checked undone: the
    benchmark's knobs are global, and the tests after this one must see the CPU's path again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "KERNEL_DEVICES", set(dispatch.KERNEL_DEVICES))
        mp.setattr(dispatch, "KERNEL_DTYPES", set(dispatch.KERNEL_DTYPES))
        mp.setattr(dispatch, "merged_pays", dispatch.merged_pays)
        for name in ("AVAILABLE", "tl", *host_overhead.KERNELS):
            mp.setattr(kernels, name, getattr(kernels, name, None), raising=False)
        host_overhead.take_the_cuda_path()
        yield
        kernels.clear_launches()
    assert "cpu" not in dispatch.KERNEL_DEVICES and torch.float32 not in dispatch.KERNEL_DTYPES
    assert not dispatch.merged_pays(1 << 20, torch.empty(4, 4))


def paths(model, ids) -> list[dispatch.Path]:
    """The paths `dispatch.choose` picks in one training step of `model`."""
    seen, real = [], dispatch.choose

    def spy(*args, **kwargs):
        path = real(*args, **kwargs)
        seen.append(path)
        return path
    dispatch.choose = spy
    try:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    finally:
        dispatch.choose = real
    return seen


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_host_overhead_takes_the_cuda_path(cuda_path, p):
    w = harness.Workload("cpu", host_overhead.TINY)
    found = paths(w.ours(p).train(), w.ids)
    computed = [path for path in found if path.kind in (dispatch.FUSED, dispatch.SHARED)]
    assert computed and all(path.kind != dispatch.PLAIN for path in found)
    if p > 0:  # the dropout masks drawn in the kernels, as on CUDA
        assert all(path.kernels and path.p == p for path in computed)
    else:  # the merged weight for the single linears' dx, as on CUDA at the benchmarks' token counts (groups never
        # merge in training)
        assert all(path.merged == (path.kind == dispatch.FUSED) for path in computed)
        assert any(path.kind == dispatch.FUSED for path in computed) and any(path.kind == dispatch.SHARED
                                                                             for path in computed)
