"""Stand-ins for layers `torch.export` cannot trace, offered by their weight formats (`analysis_stand_in`)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from surgery.core.registry import manager


@contextlib.contextmanager
def analysis_stand_ins(model: nn.Module) -> Iterator[int]:
    """Inside the block, every module whose weight format offers `analysis_stand_in` is replaced (at every
    parent that holds it) by that stand-in; on exit the original module objects are put back. Yields how many
    were replaced. The analysis uses them only when the model as it is cannot be traced."""
    formats = [f for f in manager().formats if hasattr(f, "analysis_stand_in")]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stand_ins: dict[int, nn.Module] = {}
    try:
        if formats:
            for _, parent in list(model.named_modules(remove_duplicate=False)):
                for name, child in list(parent._modules.items()):
                    fmt = next((f for f in formats if child is not None and f.matches(child)), None)
                    if fmt is None:
                        continue
                    if id(child) not in stand_ins:
                        stand_ins[id(child)] = fmt.analysis_stand_in(child)
                    parent._modules[name] = stand_ins[id(child)]
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
