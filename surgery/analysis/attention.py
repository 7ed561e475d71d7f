"""Attention computations in an analysis graph: where they are, which projections feed them, their shape facts.

SDPA calls and eager matmul -> (scale, mask) -> softmax -> matmul chains are found by op pattern; q/k/v
projections by walking back through layout, element-wise and norm ops inside the attention module; the output
projection by walking forward; fused projections are split by a gradient probe.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from surgery.analysis.dataflow import (
    ELEMENTWISE_OPS,
    LAYOUT_OPS,
    WALK_OPS,
    GraphIndex,
    LinearSite,
    is_block,
    module_input,
    op_name,
    parent_path,
    tensor_val,
    within,
)
from surgery.analysis.probes import Slices, channel_probe, evaluate
from surgery.analysis.tracing import AnalysisTrace
from surgery.core.sites import AttentionInfo

_SCORE_OPS = frozenset({"mul", "mul_", "div", "div_", "add", "add_", "sub", "tanh", "to", "_to_copy", "where",
                        "masked_fill", "masked_fill_", "clamp", "dropout", "contiguous", "view", "reshape",
                        "type_as", "float"})
_PROB_OPS = frozenset({"to", "_to_copy", "dropout", "type_as", "contiguous", "clone", "float", "view", "reshape"})
_QK_MATMULS = frozenset({"matmul", "bmm", "baddbmm"})


@dataclass(frozen=True)
class AttentionOp:
    """One attention computation in the graph: its q, k, v operands, output, and mask operands."""

    implementation: str
    owner: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    output: fx.Node
    masks: tuple[tuple[fx.Node, str], ...]  # (mask node, "keep" | "drop" | "additive")
    is_causal: bool
    lengths: tuple[int, int] | None  # (query length, key length)


def _sdpa(node: fx.Node, index: GraphIndex) -> AttentionOp:
    args = list(node.args) + [None] * (6 - len(node.args))
    mask = node.kwargs.get("attn_mask", args[3])
    causal = bool(node.kwargs.get("is_causal", args[5]) or False)
    masks: tuple[tuple[fx.Node, str], ...] = ()
    if isinstance(mask, fx.Node):
        val = tensor_val(mask)
        masks = ((mask, "keep" if val is not None and val.dtype == torch.bool else "additive"),)
    q, k = tensor_val(node.args[0]), tensor_val(node.args[1])
    lengths = (int(q.shape[-2]), int(k.shape[-2])) if q is not None and k is not None else None
    return AttentionOp("sdpa", index.owner[node], node.args[0], node.args[1], node.args[2], node, masks, causal,
                       lengths)


def _eager(softmax: fx.Node, index: GraphIndex) -> AttentionOp | None:
    node, masks = softmax.args[0], []
    while isinstance(node, fx.Node) and op_name(node) not in _QK_MATMULS:
        name = op_name(node)
        chain = [i for i in node.all_input_nodes if i in index.from_user]
        if name not in _SCORE_OPS or len(chain) != 1:
            return None
        others = [i for i in node.all_input_nodes if i not in index.from_user and tensor_val(i) is not None]
        if name in ("add", "add_", "sub"):
            masks += [(m, "additive") for m in others]
        elif name in ("masked_fill", "masked_fill_"):
            masks += [(m, "drop") for m in others]
        elif name == "where" and isinstance(node.args[0], fx.Node) and node.args[0] not in index.from_user:
            masks.append((node.args[0], "keep" if node.args[1] is chain[0] else "drop"))
        node = chain[0]
    if not isinstance(node, fx.Node):
        return None
    q, k = (node.args[1], node.args[2]) if op_name(node) == "baddbmm" else (node.args[0], node.args[1])
    if not all(isinstance(t, fx.Node) and t in index.from_user for t in (q, k)):
        return None
    probs, queue = None, deque([softmax])
    while queue and probs is None:
        current = queue.popleft()
        for user in current.users:
            if op_name(user) in ("matmul", "bmm") and user.args[0] is current and user.args[1] in index.from_user:
                probs = user
                break
            if op_name(user) in _PROB_OPS:
                queue.append(user)
    if probs is None:
        return None
    scores = tensor_val(node)
    lengths = (int(scores.shape[-2]), int(scores.shape[-1])) if scores is not None else None
    return AttentionOp("eager", index.owner[softmax], q, k, probs.args[1], probs, tuple(masks), False, lengths)


def attention_ops(index: GraphIndex) -> list[AttentionOp]:
    """SDPA calls and eager matmul -> (scale, mask) -> softmax -> matmul chains, in graph order."""
    found = []
    for node in index.nodes:
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            found.append(_sdpa(node, index))
        elif name in ("softmax", "_softmax", "_safe_softmax") and node in index.from_user:
            op = _eager(node, index)
            if op is not None:
                found.append(op)
    return found


# ---------------------------------------------------------------------------------------------- walks


def attention_scopes(owner: str, trace: AnalysisTrace) -> list[str]:
    """Candidate scopes for an attention computation: its owner, then ancestors up to its block."""
    scopes = [owner]
    while owner and not is_block(owner, trace) and parent_path(owner):
        owner = parent_path(owner)  # type: ignore[assignment]
        scopes.append(owner)
    return scopes


def linears_behind(start: fx.Node, scope: str, index: GraphIndex, linears: dict[str, LinearSite],
                   norms: frozenset[str]) -> list[tuple[str, fx.Node]]:
    """Linear-like modules first reached walking back from `start` through layout, element-wise and norm ops
    inside `scope`; each with the node where its output was met (nearest first)."""
    hits: list[tuple[str, fx.Node]] = []
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        owner = index.owner[node]
        if owner in linears:
            if owner not in {p for p, _ in hits}:
                hits.append((owner, node))
            continue
        if node.op != "call_function" or not within(owner, scope):
            continue
        if op_name(node) not in WALK_OPS and owner not in norms:
            continue
        for i in node.all_input_nodes:
            if i in index.from_user and i not in seen:
                seen.add(i)
                queue.append(i)
    return hits


def linear_after(start: fx.Node, scope: str, index: GraphIndex, linears: dict[str, LinearSite]) -> str | None:
    """The first (in graph order) linear-like module fed from `start` through layout/element-wise ops in scope."""
    hits: list[fx.Node] = []
    seen, queue = {start}, deque([start])
    while queue:
        for user in queue.popleft().users:
            if user in seen:
                continue
            seen.add(user)
            owner = index.owner[user]
            if owner in linears:
                hits.append(user)
            elif within(owner, scope) and op_name(user) in LAYOUT_OPS | ELEMENTWISE_OPS:
                queue.append(user)
    return index.owner[min(hits, key=index.order.__getitem__)] if hits else None


# ---------------------------------------------------------------------------------------------- attention roles


def _masked(value: Any, kind: str) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    if value.dtype == torch.bool:
        return ~value if kind == "keep" else value
    if kind == "additive" and value.is_floating_point():
        return value <= torch.finfo(value.dtype).min / 2
    return None


def read_causal(op: AttentionOp, index: GraphIndex, memo: dict[fx.Node, Any]) -> bool | None:
    """True/False when the masks say whether every query sees exactly its past; None when unreadable."""
    if op.is_causal:
        return True
    if not op.masks:
        return False
    if op.lengths is None:
        return None
    sq, sk = op.lengths
    combined: torch.Tensor | None = None
    for node, kind in op.masks:
        if node not in memo:
            memo[node] = evaluate(index, node)
        masked = _masked(memo[node], kind)
        if masked is None:
            return None
        try:
            masked = masked.broadcast_to(*masked.shape[:-2], sq, sk).reshape(-1, sq, sk)
        except RuntimeError:
            return None
        if masked.shape[0] == 0:
            return None
        combined = masked.all(0) if combined is None else combined | masked.all(0)
        if not torch.equal(masked.any(0), masked.all(0)):
            return None  # differs across batch/heads: not a plain causal pattern
    if combined is None or not combined.any():
        return False
    upper = torch.ones(sq, sk, dtype=torch.bool).triu(1 + max(sk - sq, 0))
    if sq <= sk and combined[upper].all() and not combined.diagonal(sk - sq).any():
        return True
    return None


@dataclass(frozen=True)
class AttentionReading:
    """What one attention computation says: its info, role of each projection, and fused slices."""

    owner: str
    info: AttentionInfo
    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]


def read_attention(op: AttentionOp, index: GraphIndex, linears: dict[str, LinearSite], norms: frozenset[str],
                   memo: dict[fx.Node, Any]) -> AttentionReading:
    """Find q/k/v projections (walking back), the output projection (walking forward) and fused slices."""
    operands = {"attention.query": op.query, "attention.key": op.key, "attention.value": op.value}
    hits: dict[str, tuple[str, fx.Node]] = {}
    scope = op.owner
    for scope in attention_scopes(op.owner, index.trace):
        found = {role: linears_behind(node, scope, index, linears, norms) for role, node in operands.items()}
        hits = {role: h[0] for role, h in found.items() if h}
        if hits:
            break
    output = linear_after(op.output, scope, index, linears)
    roles: dict[str, set[str]] = {}
    for role, (path, _) in hits.items():
        roles.setdefault(path, set()).add(role)
    if output is not None:
        roles.setdefault(output, set()).add("attention.output")
    slices: dict[str, dict[str, Slices]] = {}
    for path, path_roles in roles.items():
        qkv = sorted(r for r in path_roles if r in operands)
        if len(qkv) < 2:
            continue
        source = next(hits[r][1] for r in qkv)
        val = tensor_val(source)
        if val is None or int(val.shape[-1]) != linears[path].out_features:
            continue
        slices[path] = channel_probe(index, source, {r: [operands[r]] for r in qkv})

    def channels(role: str) -> int | None:
        if role not in hits:
            return None
        path = hits[role][0]
        if path in slices and role in slices[path]:
            return sum(b - a for a, b in slices[path][role])
        return linears[path].out_features

    q, k = tensor_val(op.query), tensor_val(op.key)
    head_dim = int(q.shape[-1]) if q is not None else None  # q and k share it; k may come transposed

    def heads(width: int | None, dim: int | None, operand: torch.Tensor | None) -> int | None:
        if width and dim and width % dim == 0:
            return width // dim
        return int(operand.shape[-3]) if operand is not None and operand.dim() >= 4 else None

    cross = False
    if "attention.query" in hits and "attention.key" in hits:
        q_path, k_path = hits["attention.query"][0], hits["attention.key"][0]
        cross = module_input(linears[q_path], index) is not module_input(linears[k_path], index)
    info = AttentionInfo(
        implementation=op.implementation,
        query=hits.get("attention.query", (None,))[0], key=hits.get("attention.key", (None,))[0],
        value=hits.get("attention.value", (None,))[0], output=output,
        num_heads=heads(channels("attention.query"), head_dim, q),
        num_kv_heads=heads(channels("attention.key"), head_dim, k),
        head_dim=head_dim, cross=cross, causal=read_causal(op, index, memo),
        hidden_size=linears[hits["attention.key"][0]].in_features if "attention.key" in hits else None)
    return AttentionReading(op.owner, info, {p: frozenset(r) for p, r in roles.items()}, slices)
