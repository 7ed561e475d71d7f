"""LoRA layers over given tensors, for tests of LoRA's paths: a call goes through dispatch.py as the Host's would,
and gradients reach the very tensors the test made."""
from types import SimpleNamespace

from torch import nn

from surgery_plugins.lora import dispatch
from surgery_plugins.lora.branches import LoraBranch
from surgery_plugins.lora.plugin import LoraParams
from surgery_plugins.lora.shared import SharedInput

PER_MEMBER = 4  # weight, bias, A, B


def linear_of(weight, bias):
    """An nn.Linear whose weight and bias are `weight` and `bias` themselves (plain tensors, not copies)."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    del base.weight
    base.weight = weight
    if bias is not None:
        del base.bias
        base.bias = bias
    return base


def branch_of(a, b, scale, p=0.0, training=True):
    """A LoraBranch holding `a` and `b` themselves, with scale `scale` and dropout `p` (in training mode)."""
    branch = LoraBranch(a.shape[1], b.shape[0], LoraParams(r=a.shape[0], dropout=p), a.dtype, a.device)
    del branch.lora_A, branch.lora_B
    branch.lora_A, branch.lora_B = a, b
    branch.scale = scale
    return branch.train(training)


def alone_host():
    """The public state of a host at which one branch runs, unrouted."""
    return SimpleNamespace(running=("a",), routing=None)


def layers(scales, p, *tensors):
    """(branch, base) per member, 4 tensors each (weight, bias or None, A, B), linked as a group reading one input
    where there are several, each alone at its site."""
    pairs = [(branch_of(tensors[i + 2], tensors[i + 3], s, p), linear_of(tensors[i], tensors[i + 1]))
             for s, i in zip(scales, range(0, len(tensors), PER_MEMBER))]
    if len(pairs) > 1:
        shared = SharedInput([branch for branch, _ in pairs])
        for index, (branch, base) in enumerate(pairs):
            branch.reads_with("x", base)
            branch.link(shared, index, alone_host())
            branch.running = True
    return pairs


def lora_linear(x, weight, bias, a, b, scale, p):
    """One LoRA linear's output on `x`, by the path the dispatch chooses for a branch alone at its site."""
    (branch, base), = layers((scale,), p, weight, bias, a, b)
    return dispatch.forward(branch, base, (x,), {})


def shared_outputs(x, scales, p, *tensors):
    """The outputs of linears reading one input `x`, called in turn as a model calls them (the first member's
    call computes the group's outputs where the dispatch sends it to the shared path)."""
    return [dispatch.forward(branch, base, (x,), {}) for branch, base in layers(scales, p, *tensors)]
