"""Integer inputs whose values drive shapes, fixed for a trace.

A vision tower of Qwen2-VL's kind takes `grid_thw`, the (time, height, width) patch grid of each image, and
computes its tensors' sizes from the grid's values (`grid_thw.prod(-1)`, `repeat_interleave`, `cu_seqlens` from a
cumsum, `torch.split` by `.tolist()` sizes): a trace on fake tensors cannot know them. Inside `fixed_inputs` such
inputs are no inputs of the trace: the model's forward is called with them closed over, and every op whose tensors
all come from them runs on their real values (outside the trace's fake and tracing modes), so `.tolist()` and
`.item()` give Python numbers and the sizes are static. Where such values meet the traced tensors they enter the
graph as constants. The graph then holds for these values alone, which is all the analysis needs (the roles do not
depend on the grid). Beside a model on the meta device the values stay on the cpu (an op on them alone that asks for
the meta device gets theirs), and go to the meta device where they meet the model's tensors. The model's 0-dim
integer buffers (Encodec's convolution strides, from which it computes paddings) are fixed the same way.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

PER_TOKEN = re.compile(r"ids|mask|label|position|values|features|embeds|states")
"""Names of integer inputs that carry per-token data (ids, masks, labels, positions), never fixed."""


def value_inputs(kwargs: dict[str, Any]) -> list[str]:
    """The keyword inputs a trace may fix: integer tensors with real values (not on the meta device) whose
    names do not tell of per-token data (`PER_TOKEN`), such as `grid_thw`, `image_grid_thw`, `merge_sizes`, and
    UDOP's `bbox` (the boxes' values pick the image patches kept)."""
    return [name for name, value in kwargs.items()
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()
            and value.dtype is not torch.bool and value.device.type != "meta" and not PER_TOKEN.search(name)]


class _OnValues(TorchFunctionMode):
    """Runs on the real tensors, with the trace's dispatch modes and torch-function handling off, every op whose
    tensor arguments are all known (the fixed inputs and what was computed from them alone), and every op of no
    tensor argument (a factory: `arange`, `tensor`, `full`) whose result is not floating point (index and size
    arithmetic; a floating one, often a buffer the traced tensors are written into, is traced); the results are
    known too. Any other op is left to the trace; a known tensor it writes into (an in-place op, `out=`, item
    assignment) is known no more, with every known tensor of its storage."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.known: dict[int, torch.Tensor] = {id(t): t for t in tensors}  # held, so no id is reused
        self.home = tensors[0].device if tensors else torch.device("cpu")

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        symbolic = any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves)
        if symbolic or any(id(t) not in self.known for t in tensors):
            self._forget(_written(func, args, kwargs))
            return func(*self._on_meta(args, tensors), **self._on_meta(kwargs, tensors))
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            out = func(*_at_home(args, self.home), **_at_home(kwargs, self.home))
        results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not tensors and any(t.is_floating_point() or t.is_complex() for t in results):
            return func(*args, **kwargs)
        for tensor in results:
            self.known[id(tensor)] = tensor
        return out

    def _on_meta(self, tree: Any, tensors: list[torch.Tensor]) -> Any:
        """`tree` with its known tensors moved to the meta device where the op's other tensors are there (a
        model on the meta device: the known values stay where they can be read)."""
        if not any(t.device.type == "meta" for t in tensors if id(t) not in self.known):
            return tree
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            return pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta") if id(t) in self.known and t.dim() else t,
                                        tree)  # a 0-dim one is a cpu scalar, welcome beside any device

    def _forget(self, written: list[Any]) -> None:
        storages = {_storage(t) for t in written if isinstance(t, torch.Tensor) and id(t) in self.known}
        if storages:
            self.known = {i: t for i, t in self.known.items() if _storage(t) not in storages}


def _at_home(tree: Any, home: torch.device) -> Any:
    """`tree` with every meta device in it (`device="meta"`, `.to("meta")`) replaced by `home`, where the values
    are."""
    def moved(leaf: Any) -> Any:
        meta = isinstance(leaf, (torch.device, str)) and str(leaf) == "meta"
        return home if meta else leaf

    return pytree.tree_map(moved, tree) if home.type != "meta" else tree


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _written(func: Callable, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments an op writes into: `out=`, and the first of an in-place method or of item assignment."""
    name = getattr(func, "__name__", "")
    first = list(args[:1]) if name == "__setitem__" or (name.endswith("_") and not name.endswith("__")) else []
    return first + pytree.tree_leaves(kwargs.get("out"))


def scalar_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The 0-dim integer buffers of `model` and its submodules, as (module, name): sizes kept as tensors (Encodec's
    convolutions' stride and kernel size, from which the padding of each call is computed)."""
    return [(module, name) for module in model.modules() for name, buffer in module._buffers.items()
            if isinstance(buffer, torch.Tensor) and buffer.dim() == 0 and not buffer.is_floating_point()
            and not buffer.is_complex() and buffer.dtype is not torch.bool and buffer.device.type != "meta"]


@contextlib.contextmanager
def fixed_inputs(model: nn.Module, kwargs: dict[str, Any], names: list[str],
                 buffers: Sequence[tuple[nn.Module, str]] = ()) -> Iterator[dict[str, Any]]:
    """Inside the block, `model.forward` takes the inputs `names` of `kwargs` as fixed, closed-over values run
    on for real (`_OnValues`), and the `buffers` (`scalar_buffers`) likewise: while the forward runs, copies of
    their real tensors replace the ones the trace put in their place; yields the other kwargs, the ones to trace
    with. The model's own forward (an instance attribute included) is put back on exit; the inputs and buffers
    fixed are copies, so the model and the inputs are as they were."""
    if not names and not buffers:
        yield kwargs
        return
    fixed = {name: kwargs[name].clone() for name in names}  # copies: an op on them in place changes no input
    rest = {name: value for name, value in kwargs.items() if name not in fixed}
    real = [(module, name, module._buffers[name].clone()) for module, name in buffers]
    original = model.forward

    def forward(*args: Any, **inputs: Any) -> Any:
        traced = [(module, name, module._buffers[name]) for module, name, _ in real]
        try:
            for module, name, value in real:
                module._buffers[name] = value
            with _OnValues([*fixed.values(), *(value for _, _, value in real)]):
                return original(*args, **inputs, **fixed)
        finally:
            for module, name, value in traced:
                module._buffers[name] = value

    signature = inspect.signature(original)
    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name not in fixed])  # export names inputs by it
    with replaced_forward(model, forward):
        yield rest


@contextlib.contextmanager
def replaced_forward(model: nn.Module, forward: Callable) -> Iterator[None]:
    """Inside the block, `model.forward` is `forward`; on exit the model's own forward (an instance attribute
    included) is put back, also on errors."""
    own = vars(model).get("forward")
    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own  # type: ignore[method-assign]
