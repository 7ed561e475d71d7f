"""Version counters: whether tensors were written in place since an earlier read (counters only grow, so equal
readings mean no write in between). Kept outputs and kept joined pairs are checked with them."""
from __future__ import annotations

import operator

import torch

_VERSION = operator.attrgetter("_version")


def of(tensors: tuple[torch.Tensor, ...]) -> tuple:
    """The version counters of `tensors` (an inference tensor has none: None)."""
    try:
        return tuple(map(_VERSION, tensors))
    except RuntimeError:
        return tuple(None if t.is_inference() else t._version for t in tensors)
