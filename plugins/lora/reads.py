"""A branch's pair, dropout and channels, and a plain linear's weight and bias, as LoRA's per-call paths read them:
from nn.Module's own dictionaries. `module.name` for a parameter, buffer or submodule goes through
nn.Module.__getattr__ (about 0.6 µs a read on this project's CPUs, after the failed ordinary lookup), and the
dispatch and the routed paths make tens of such reads per call. Each function falls back to the attribute where
the dictionary does not hold it (a parametrized tensor, a layer that keeps its bias elsewhere)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def pair(branch: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA branch's (A, B)."""
    found = branch._parameters
    a, b = found.get("lora_A"), found.get("lora_B")
    return (a, b) if a is not None and b is not None else (branch.lora_A, branch.lora_B)


def dropout(branch: nn.Module) -> nn.Module:
    """A LoRA branch's dropout module (nn.Dropout, or nn.Identity for none)."""
    found = branch._modules.get("dropout")
    return found if found is not None else branch.dropout


def channels(branch: nn.Module) -> torch.Tensor | None:
    """A LoRA branch's output channels (None: all of them)."""
    found = branch._buffers
    if "channels" in found:
        return found["channels"]
    return branch.channels


def weight_bias(base: nn.Module) -> tuple[Any, torch.Tensor | None]:
    """A linear layer's (weight, bias); bias None where it has none."""
    found = base._parameters
    if "weight" in found and "bias" in found:
        return found["weight"], found["bias"]
    return base.weight, base.bias
