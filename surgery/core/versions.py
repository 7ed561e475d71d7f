"""Version counters: whether tensors were written in place since an earlier reading. Counters only grow, so two
equal readings mean no write in between (an optimizer step, `load_state_dict` and `p.mul_(...)` all count; a
write through `p.data` does not). What is kept across calls and made from tensors is checked with them."""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

_VERSION = operator.attrgetter("_version")


def versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """The version counters of `tensors`, in order (an inference tensor has none: None)."""
    tensors = tuple(tensors)
    try:
        return tuple(map(_VERSION, tensors))
    except RuntimeError:
        return tuple(None if t.is_inference() else t._version for t in tensors)
