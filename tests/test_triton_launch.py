"""The direct launch of compiled Triton kernels (plugins/lora/triton_launch.py): which calls take Triton's launcher,
which launch the kept kernel, with what, and that the key is at least as fine as Triton's own specialization."""
import itertools
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

import surgery_plugins.lora.triton_launch as tl_launch  # noqa: E402
from surgery_plugins.lora.kernels import INTERPRETING  # noqa: E402
from surgery_plugins.lora.triton_launch import Launch, specialization  # noqa: E402

ON_GPU = torch.cuda.is_available() and not INTERPRETING


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "function", "packed"

    def run(self, *args):
        self.log.append(("direct", args))

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)


class FakeKernel:
    """A jitted kernel's surface as Launch sees it: (x_ptr, M, seed, K: constexpr, BM: constexpr)."""

    arg_names = ["x_ptr", "M", "seed", "K", "BM"]

    def __init__(self, compiles=True):
        self.params = [SimpleNamespace(is_constexpr=name in ("K", "BM")) for name in self.arg_names]
        self.log, self.compiles, self.pre_run_hooks = [], compiles, []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log) if self.compiles else None
        return jit


@pytest.fixture
def device(monkeypatch):
    """Triton's driver as Launch asks it: current device and stream."""
    state = SimpleNamespace(device=0)
    active = SimpleNamespace(get_current_device=lambda: state.device, get_current_stream=lambda d: 1000 + d)
    monkeypatch.setattr(tl_launch, "driver", SimpleNamespace(active=active))
    return state


def kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_call_with_the_same_specialization_launches_the_kept_kernel(device):
    kernel = FakeKernel()
    launch = Launch(kernel, (4, 2), {"K": 64, "BM": 32, "num_warps": 4})
    x = torch.zeros(64)
    launch(x, 32, 7)
    assert kernel.log == [("jit", (4, 2), (x, 32, 7), {"K": 64, "BM": 32, "num_warps": 4})]
    launch(x, 48, 8)  # same specialization: M divisible by 16, not 1; the seed's value is not part of it
    knobs = tl_launch.knobs.runtime
    assert kernel.log[-1] == ("direct", (4, 2, 1, 1000, "function", "packed", ("metadata", (4, 2), 1000),
                                         knobs.launch_enter_hook, knobs.launch_exit_hook, x, 48, 8, 64, 32))


@pytest.mark.parametrize("change", ["unaligned tensor", "other dtype", "int not divisible by 16", "int equal to 1",
                                    "int wider than 32 bits", "other device"])
def test_a_new_specialization_goes_through_tritons_launcher(device, change):
    kernel = FakeKernel()
    launch = Launch(kernel, (1,), {"K": 64, "BM": 32})
    x = torch.zeros(64)
    args = [x, 32, 7]
    launch(*args)
    if change == "unaligned tensor":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "other dtype":
        args[0] = x.double()
    elif change == "int not divisible by 16":
        args[1] = 33
    elif change == "int equal to 1":
        args[1] = 1
    elif change == "int wider than 32 bits":
        args[2] = 2 ** 40
    else:
        device.device = 1
    launch(*args)
    launch(*args)
    assert kinds(kernel) == ["jit", "jit", "direct"]


def test_no_kept_kernel_under_the_interpreter_with_pre_run_hooks_or_unknown_argument_types(device):
    interpreted = FakeKernel(compiles=False)  # Triton's interpreter returns no compiled kernel
    launch = Launch(interpreted, (1,), {"K": 64, "BM": 32})
    for _ in range(3):
        launch(torch.zeros(4), 4, 1)
    assert kinds(interpreted) == ["jit"] * 3

    hooked = FakeKernel()
    launch = Launch(hooked, (1,), {"K": 64, "BM": 32})
    launch(torch.zeros(4), 4, 1)
    hooked.pre_run_hooks.append(lambda *a, **k: None)
    launch(torch.zeros(4), 4, 1)
    assert kinds(hooked) == ["jit", "jit"]

    other = FakeKernel()
    launch = Launch(other, (1,), {"K": 64, "BM": 32})
    for _ in range(2):
        launch(torch.zeros(4), 4, 0.5)  # a float run-time argument: not keyed here
    assert kinds(other) == ["jit", "jit"]


def test_wrong_argument_count_or_constants_at_runtime_positions():
    kernel = FakeKernel()
    with pytest.raises(TypeError, match="3 run-time arguments"):
        Launch(kernel, (1,), {"K": 64, "BM": 32})(torch.zeros(4), 4)
    odd = Launch(kernel, (1,), {"M": 4, "K": 64, "BM": 32})  # M is not a constexpr: never launched directly
    assert odd.tail is None


def test_key_is_at_least_as_fine_as_tritons_specialization():
    """Arguments with equal keys here get equal specializations from Triton itself."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.to(torch.float16), base.to(torch.float16)[8:], base.to(torch.int32)]
    ints = [0, 1, 2, 15, 16, 17, 32, 2 ** 31 - 16, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 63, 2 ** 64 - 16, -1, -16, -2 ** 31,
            -2 ** 31 - 16]
    for group in (tensors, ints):
        for a, b in itertools.combinations(group, 2):
            if specialization(a) == specialization(b):
                assert native(BaseBackend, a, False, True, True) == native(BaseBackend, b, False, True, True), (a, b)


@pytest.mark.skipif(not ON_GPU, reason="launches a compiled kernel on CUDA")
def test_direct_launches_on_the_gpu_match_tritons_launcher():
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, M, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < M
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) + 2 * tl.load(y_ptr + offsets, mask=inside),
                 mask=inside)

    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(1000, device="cuda", generator=g) for _ in range(2))
    launch = Launch(add_kernel, (8,), {"BLOCK": 128})
    for offset in (0, 0, 1, 1, 4, 4):  # each new alignment compiles once, then launches directly
        xs, ys = x[offset:offset + 900], y[offset:offset + 900]
        out = torch.empty(900, device="cuda")
        launch(xs, ys, out, 900)
        torch.testing.assert_close(out, xs + 2 * ys, rtol=0, atol=0)
    assert len(launch._compiled) == 2  # aligned and unaligned (offsets 1 and 4 are both off 16 bytes)
