"""Model-level roles from dataflow: the embedding that reads the user's token ids, and the LM head."""
from __future__ import annotations

from typing import Iterable

from torch import fx

from surgery.analysis.dataflow import WALK_OPS, GraphIndex, LinearSite, op_name, strip_layout


def token_embeddings(index: GraphIndex, embeddings: Iterable) -> list[str]:
    """Embeddings looked up with the user's token ids (not positions, not token types)."""
    tokens = index.trace.token_inputs
    found = []
    for site in embeddings:
        for lookup in site.lookups:
            root = strip_layout(lookup.args[1], index) if isinstance(lookup.args[1], fx.Node) else None
            if root is not None and root.op == "placeholder" and root.name in tokens:
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
