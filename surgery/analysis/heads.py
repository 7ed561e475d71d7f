"""Model-level roles from dataflow: the embedding that reads the user's token ids, the LM head, poolers and task
heads."""
from __future__ import annotations

from typing import Iterable

from torch import fx

from surgery.analysis.dataflow import (
    ACTIVATION_OPS,
    ELEMENTWISE_OPS,
    LAYOUT_OPS,
    WALK_OPS,
    GraphIndex,
    LinearSite,
    alias_writes,
    op_name,
    reaches_back,
    tensor_val,
)

_ID_SUBSTITUTIONS = frozenset({"masked_fill", "masked_fill_", "clamp", "clamp_", "clamp_min", "clamp_max",
                                "index_put", "index_put_", "index_fill", "index_fill_", "masked_scatter",
                                "masked_scatter_", "scatter", "scatter_"})
"""Ops that replace some ids and keep the others (their first operand): placeholders of image tokens set to 0 by
`ids[mask] = 0` (PaliGemma, Gemma 3), a clamp into the vocabulary."""
_ID_ARITHMETIC = frozenset({"add", "add_", "sub", "sub_", "remainder", "mul", "mul_"})
"""Ops that offset or wrap ids, or zero some (`ids * keep`): every operand is followed."""
_ID_CONTAINERS = frozenset({"new_zeros", "new_full", "new_empty", "new_ones", "zeros_like", "full_like",
                            "empty_like"})
"""A fresh tensor the ids are written into (`shifted[:, 1:] = ids[:, :-1]`): its data are the writes only."""


def _id_sources(node: fx.Node) -> list[fx.Node]:
    """The operands whose values a node's ids are, or are written from (comparisons, counts and cumulative sums
    make masks and positions of ids, and are no sources)."""
    name = op_name(node)
    if name == "where":  # the ids come from the chosen values, not from the condition
        sources = list(node.args[1:3])
    elif name in LAYOUT_OPS or name in _ID_SUBSTITUTIONS:
        first = node.args[0] if node.args else None
        sources = list(first) if isinstance(first, (list, tuple)) else [first]  # cat/stack take a list
    elif name in _ID_ARITHMETIC:
        sources = list(node.args)
    elif name in _ID_CONTAINERS:
        sources = []
    else:
        return []
    for write in alias_writes(node):  # data written in place into the tensor or a view of it
        sources += list(write.args[1:])
    return [s for s in sources if isinstance(s, fx.Node)]


def _from_tokens(ids: fx.Node, index: GraphIndex, tokens: frozenset[str]) -> bool:
    """Whether lookup indices are the user's token ids, possibly through layout ops, id substitutions (where,
    masked_fill, clamp, `ids[mask] = 0`), offsets and writes into a fresh tensor, but no arithmetic that makes
    them positions (cumsum, arange) or masks (comparisons)."""
    return reaches_back(ids, lambda node: _id_sources(node) if node.op == "call_function" else [], index.from_user,
                        lambda placeholder: placeholder.name in tokens)


def token_embeddings(index: GraphIndex, embeddings: Iterable) -> list[str]:
    """Embeddings looked up with the user's token ids (not positions, not token types)."""
    tokens = index.trace.token_inputs
    found = []
    for site in embeddings:
        for lookup in site.lookups:
            if isinstance(lookup.args[1], fx.Node) and _from_tokens(lookup.args[1], index, tokens):
                found.append(site.path)
                break
    return found



def lm_heads(index: GraphIndex, linears: dict[str, LinearSite], vocab: int, norms: frozenset[str]) -> list[str]:
    """Linear-like sites with `vocab` outputs whose result reaches the graph output through layout/element-wise
    ops only."""
    heads = []
    for site in linears.values():
        if site.out_features != vocab:
            continue
        seen, stack, hit = {site.matmul}, [site.matmul], False
        while stack and not hit:
            for user in stack.pop().users:
                if user.op == "output":
                    hit = True
                    break
                owner = index.owner[user]
                passable = owner == site.path or (owner not in norms and owner not in linears
                                                 and op_name(user) in WALK_OPS)
                if user not in seen and passable:
                    seen.add(user)
                    stack.append(user)
        if hit:
            heads.append(site.path)
    return heads


_POOLING_OPS = frozenset({"select", "index", "slice", "getitem", "mean", "amax", "max", "sum", "gather",
                          "index_select", "narrow", "squeeze", "_unsafe_index"})


def _numel(node: fx.Node) -> int | None:
    val = tensor_val(node)
    return int(val.numel()) if val is not None else None


def pooled_input(site: LinearSite, index: GraphIndex, linears: dict[str, LinearSite], norms: frozenset[str]) -> bool:
    """Whether the site reads a pooled representation: walking back from its input (through layout,
    element-wise and activation ops, not through other linears), a pooling op drops the sequence dimension
    (fewer elements out than in, the feature dimension kept): BERT's hidden[:, 0], BART's eos token, a mean."""
    seen, stack = {site.x}, [site.x]
    while stack:
        node = stack.pop()
        owner = index.owner[node]
        if node.op != "call_function" or (owner in linears and owner != site.path) or owner in norms:
            continue
        inputs = [i for i in node.all_input_nodes if i in index.from_user]
        name = op_name(node)
        if name in _POOLING_OPS and len(inputs) >= 1:
            out, src = tensor_val(node), tensor_val(inputs[0])
            if (out is not None and src is not None and out.dim() >= 1 and src.dim() > out.dim()
                    and out.shape[-1] == src.shape[-1] and out.numel() < src.numel()):
                return True
        if name not in WALK_OPS and name not in _POOLING_OPS:
            continue
        for i in inputs:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return False


def _activated(site: LinearSite, index: GraphIndex, linears: dict[str, LinearSite]) -> bool:
    """Whether the site's output passes an activation before any other linear-like module."""
    seen, stack = {site.matmul}, [site.matmul]
    while stack:
        for user in stack.pop().users:
            owner = index.owner[user]
            if user in seen or (owner in linears and owner != site.path):
                continue
            if op_name(user) in ACTIVATION_OPS:
                return True
            if op_name(user) in LAYOUT_OPS | ELEMENTWISE_OPS:
                seen.add(user)
                stack.append(user)
    return False


def _reaches_output(site: LinearSite, index: GraphIndex, linears: dict[str, LinearSite],
                    norms: frozenset[str]) -> bool:
    seen, stack = {site.matmul}, [site.matmul]
    while stack:
        for user in stack.pop().users:
            if user.op == "output":
                return True
            owner = index.owner[user]
            passable = owner == site.path or (owner not in norms and owner not in linears and op_name(user) in WALK_OPS)
            if user not in seen and passable:
                seen.add(user)
                stack.append(user)
    return False


def poolers(index: GraphIndex, linears: dict[str, LinearSite], norms: frozenset[str]) -> set[str]:
    """Linears reading a pooled representation whose output is activated (BERT's pooler.dense, a
    classification head's dense layer): role `pooler`, never MLP."""
    return {path for path, site in linears.items()
            if pooled_input(site, index, linears, norms) and _activated(site, index, linears)}


def task_heads(index: GraphIndex, linears: dict[str, LinearSite], norms: frozenset[str],
               taken: Iterable[str]) -> set[str]:
    """Linears whose output reaches the graph output through layout/element-wise ops only (a classifier, a score
    or projection head) and that have no other role (`taken`): role `head`, never MLP."""
    taken = set(taken)
    return {path for path, site in linears.items()
            if path not in taken and _reaches_output(site, index, linears, norms)}
