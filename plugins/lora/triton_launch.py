"""Launching a Triton kernel whose compile-time arguments and grid are fixed, for less host time than
`kernel[grid](...)`.

Triton's JIT launcher binds and specializes every argument on each call, compile-time ones included. For the
LoRA kernels' 15 to 37 arguments that cost the lent H100 hosts 8 to 48 µs more per call than launching the
compiled kernel (`benchmarks/launch_host_cost.py`; a torch op costs them about 10 µs).

A `Launch` is built once per shape (its callers cache it). The first call with each specialization of the
run-time arguments goes through Triton's launcher and keeps the compiled kernel that it returns; later calls
with that specialization launch the compiled kernel directly, with the arguments, stream and launch hooks that
Triton's launcher would pass. The key is at least as fine as Triton's own specialization of run-time arguments
(a tensor's dtype and 16-byte alignment; an integer's being 1, its divisibility by 16 and its width), plus the
device, so a direct launch runs the kernel that Triton would have chosen. Anything else (Triton's interpreter,
pre-run hooks, an argument of another type) takes Triton's launcher. A direct launch skips one check of Triton's:
that the global values a kernel read when compiled are unchanged (the LoRA kernels read no globals but other
jitted functions).
"""
from __future__ import annotations

from typing import Any

import torch

try:
    from triton import knobs
    from triton.runtime import driver
except ImportError:  # no Triton, or one without these: every launch goes through kernel[grid]
    knobs = driver = None

DIRECT = True  # False: every launch through Triton's launcher (benchmarks/launch_host_cost.py compares the two)


def specialization(arg: Any) -> tuple | None:
    """What Triton's compiled kernel depends on in run-time argument `arg`, or None for a type not handled here."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -2 ** 31 <= arg < 2 ** 31, arg >= 2 ** 63
    return None


class Launch:
    """`kernel[grid](*args, **constants)` for run-time arguments `args` (the kernel's leading parameters), with the
    compiled kernel kept per specialization of `args` (see the module docstring)."""

    def __init__(self, kernel: Any, grid: tuple[int, ...], constants: dict[str, Any]):
        self.kernel, self.grid, self.constants = kernel, tuple(grid), constants
        self.grid3 = self.grid + (1,) * (3 - len(self.grid))
        names = list(getattr(kernel, "arg_names", []))
        params = getattr(kernel, "params", None)
        self.runtime = sum(name not in constants for name in names) if names else None  # None: not known
        direct = (knobs is not None and names and params is not None and len(params) == len(names)
                  and all(not p.is_constexpr for p in params[:self.runtime])
                  and all(p.is_constexpr for p in params[self.runtime:]))
        self.tail = tuple(constants[name] for name in names[self.runtime:]) if direct else None
        self._compiled: dict[tuple, tuple] = {}

    def __call__(self, *args: Any) -> None:
        if self.runtime is not None and len(args) != self.runtime:
            raise TypeError(f"{self.runtime} run-time arguments expected, got {len(args)}")
        if not DIRECT or self.tail is None or getattr(self.kernel, "pre_run_hooks", None):
            self.kernel[self.grid](*args, **self.constants)
            return
        device = driver.active.get_current_device()
        key = (device, *map(specialization, args))
        found = self._compiled.get(key)
        if found is None:
            compiled = self.kernel[self.grid](*args, **self.constants)
            if compiled is not None and None not in key:
                self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)
            return
        run, function, packed, compiled = found
        full = args + self.tail
        stream = driver.active.get_current_stream(device)
        run(*self.grid3, stream, function, packed, compiled.launch_metadata(self.grid, stream, *full),
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
