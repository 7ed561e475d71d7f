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
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from surgery.analysis.dataflow import (
    ELEMENTWISE_OPS,
    LAYOUT_OPS,
    WALK_OPS,
    ExpertSite,
    GraphIndex,
    LinearSite,
    alias_writes,
    backward_closure,
    is_block,
    learned_tokens,
    module_input,
    op_name,
    parent_path,
    tensor_val,
    within,
)
from surgery.analysis.probes import Slices, channel_probe, evaluate, forward_closure
from surgery.analysis.tracing import AnalysisTrace
from surgery.core.sites import AttentionInfo

_SCORE_OPS = frozenset({"mul", "mul_", "div", "div_", "add", "add_", "sub", "sub_", "tanh", "to", "_to_copy",
                        "where", "masked_fill", "masked_fill_", "clamp", "clamp_min", "clamp_max", "max", "maximum",
                        "amax", "dropout", "contiguous", "view", "reshape", "type_as", "float", "cat", "concat",
                        "getitem", "slice", "expand", "clone", "_unsafe_view", "squeeze", "unsqueeze", "transpose",
                        "permute", "softcap"})
"""Ops between the q·k product and the softmax: scaling, masks, soft caps, clamps (xglm's max with finfo.min),
attention sinks (gpt_oss: a cat with sink logits and the subtraction of the row max), layout."""
_REDUCTIONS = frozenset({"max", "amax", "logsumexp"})
_PROB_OPS = frozenset({"to", "_to_copy", "dropout", "type_as", "contiguous", "clone", "float", "view", "reshape",
                       "slice", "getitem", "narrow", "mul", "masked_fill", "where", "_unsafe_view", "expand", "div",
                       "add", "sub", "detach", "scatter", "transpose", "permute", "masked_fill_", "mul_", "div_"})
"""Ops between the softmax and the product with v: dropout, casts, renormalisation, hard assignment
(GroupViT's straight-through one-hot: y_hard - y_soft.detach() + y_soft)."""
_POOL_OPS = frozenset({"max", "amax", "mean", "sum", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d",
                       "adaptive_avg_pool1d", "adaptive_avg_pool2d"})
"""Token pooling a query may pass after its projection (Hiera's query pooling); a sum, whether over tokens (DeepSeek
V4's compressor: keys and values summed over a window, weighted by a softmax gate) or over each pair of rope's
complex product (PE Audio's `(q * freqs).sum(5)`): the operand still depends on the projection's channels."""


_QK_MATMULS = frozenset({"matmul", "bmm", "baddbmm", "einsum"})
_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})


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
    lengths = _lengths(q.shape[-2], k.shape[-2]) if q is not None and k is not None else None
    return AttentionOp("sdpa", index.owner[node], node.args[0], node.args[1], node.args[2], node, masks, causal,
                       lengths)


def matmul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two multiplied operands of a matmul-type node (`baddbmm`'s batch products, `einsum`'s two operands)."""
    name = op_name(node)
    if name == "baddbmm":
        return node.args[1], node.args[2]
    if name == "einsum":
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return (operands[0], operands[1]) if len(operands) == 2 else None
    if name in ("matmul", "bmm", "mm"):
        return node.args[0], node.args[1]
    return None


def _activation(node: fx.Node, index: GraphIndex) -> bool:
    """A value computed from user inputs, or learned tokens (`dataflow.learned_tokens`: query tokens, latents), not
    from constants or buffers alone (rotary tables)."""
    return node in index.from_user or learned_tokens(node, index)


class _Scores:
    """Which nodes are attention scores: a product of two user-dependent operands, or derived from one through
    score ops (scale, mask, cap, clamp, sinks, layout). Memoised per graph."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.memo: dict[fx.Node, fx.Node | None] = {}

    def source(self, node: Any, depth: int = 0) -> fx.Node | None:
        """The q·k product `node` derives from, or None."""
        if not isinstance(node, fx.Node) or node not in self.index.from_runtime or depth > 40:
            return None
        if node in self.memo:
            return self.memo[node]
        name = op_name(node)
        found: fx.Node | None = None
        if name in _QK_MATMULS:
            operands = matmul_operands(node)
            if operands and all(isinstance(t, fx.Node) and _activation(t, self.index) for t in operands):
                found = node
        elif name in _SCORE_OPS:
            for i in node.all_input_nodes:
                found = self.source(i, depth + 1)
                if found is not None:
                    break
        self.memo[node] = found
        return found

    def chain_input(self, node: fx.Node) -> fx.Node | None:
        """The input of a score op that carries the scores on (not a mask, not a row max taken of them)."""
        candidates = [i for i in node.all_input_nodes if self.source(i) is not None]
        if len(candidates) > 1:
            out = tensor_val(node)
            same = [i for i in candidates if out is not None and tensor_val(i) is not None
                    and tuple(tensor_val(i).shape) == tuple(out.shape) and op_name(i) not in _REDUCTIONS
                    and not (op_name(i) == "getitem" and op_name(i.args[0]) in _REDUCTIONS)]
            candidates = same or candidates
        return candidates[0] if candidates else None


def _value_of(probs: fx.Node, current: fx.Node, index: GraphIndex) -> fx.Node | None:
    """The value operand when `probs` (from the softmax) is multiplied by it, else None."""
    operands = matmul_operands(probs)
    if operands is None or operands[0] is not current:
        return None
    value = operands[1]
    return value if isinstance(value, fx.Node) and _activation(value, index) else None


def _eager(softmax: fx.Node, index: GraphIndex, scores: _Scores) -> AttentionOp | None:
    node: Any = softmax.args[0]
    product = scores.source(node)
    if product is None:
        return None
    masks = []
    while node is not product:
        chain = scores.chain_input(node)
        if chain is None:
            return None
        name = op_name(node)
        others = [i for i in node.all_input_nodes if i is not chain and scores.source(i) is None
                  and tensor_val(i) is not None]
        if name in ("add", "add_"):
            masks += [(m, "additive") for m in others]
        elif name in ("masked_fill", "masked_fill_"):
            masks += [(m, "drop") for m in others]
        elif name == "where" and isinstance(node.args[0], fx.Node) and node.args[0] is not chain:
            masks.append((node.args[0], "keep" if node.args[1] is chain else "drop"))
        node = chain
    q, k = matmul_operands(product)  # type: ignore[misc]
    probs, value, queue, seen = None, None, deque([softmax]), {softmax}
    while queue and probs is None:
        current = queue.popleft()
        for user in current.users:
            value = _value_of(user, current, index) if op_name(user) in _QK_MATMULS else None
            if value is not None:
                probs = user
                break
            if op_name(user) in _PROB_OPS and user not in seen:
                seen.add(user)
                queue.append(user)
    if probs is None:
        return None
    val = tensor_val(product)
    lengths = _lengths(val.shape[-2], val.shape[-1]) if val is not None and val.dim() >= 2 else None
    owner = _common_owner([index.owner[product], index.owner[softmax], index.owner[probs]])
    return AttentionOp("eager", owner, q, k, value, probs, tuple(masks), False, lengths)


def _lengths(queries: int | torch.SymInt, keys: int | torch.SymInt) -> tuple[int, int] | None:
    """(query length, key length) as ints, or None where a length depends on the data (an unbacked size)."""
    try:
        return int(queries), int(keys)
    except GuardOnDataDependentSymNode:
        return None


def _common_owner(paths: list[str]) -> str:
    """The innermost module containing all `paths` (the attention module, not a softmax module inside it)."""
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def attention_ops(index: GraphIndex) -> list[AttentionOp]:
    """SDPA calls and eager q·k -> (scale, mask, cap, sinks) -> softmax -> ·v chains, in graph order."""
    found = []
    scores = _Scores(index)
    for node in index.nodes:
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            found.append(_sdpa(node, index))
        elif name in _SOFTMAX and _activation(node, index):
            op = _eager(node, index, scores)
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


def linears_behind(start: fx.Node, scope: str, index: GraphIndex, linears: dict[str, Any],
                   norms: frozenset[str], through: frozenset[str] = frozenset()) -> list[tuple[str, fx.Node]]:
    """Linear-like modules (the keys of `linears`: module paths) first reached walking back from `start` through
    layout, element-wise and norm ops (and the ops named in `through`) inside `scope`; each with the node where
    its output was met (nearest first)."""
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
        if op_name(node) not in WALK_OPS | _POOL_OPS | through | {"new_empty", "new_zeros", "empty_like",
                                                                  "zeros_like"} \
                and owner not in norms:
            continue
        inputs = list(node.all_input_nodes)
        for write in alias_writes(node):  # data written in place into the tensor or a view of it
            inputs += [i for i in write.args[1:] if isinstance(i, fx.Node)]
        for i in inputs:  # user data, or learned tokens (parameters) that a projection reads
            if i in index.from_runtime and i not in seen:
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
            memo[node] = evaluate(index, node, masks=True)
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


def depends(target: fx.Node, on: fx.Node, scope: str, index: GraphIndex) -> bool:
    """Whether `target` is computed from `on` inside module `scope` (a walk back over nodes of the scope that
    are no earlier than `on`)."""
    start = index.order[on]
    seen, stack = {target}, [target]
    while stack:
        node = stack.pop()
        if node is on:
            return True
        if node is not target and not within(index.owner[node], scope):
            continue
        for i in node.all_input_nodes:
            if i not in seen and index.order[i] >= start:
                seen.add(i)
                stack.append(i)
    return False


_SELECT_OPS = frozenset({"split", "split_with_sizes", "chunk", "slice", "select", "getitem", "narrow", "index",
                         "unbind", "index_select", "gather", "tensor_split", "_unsafe_index"})


def _selects_between(source: fx.Node, target: fx.Node, index: GraphIndex) -> bool:
    """Whether some op on the paths from `source` to `target` selects channels (a split, slice, chunk, index):
    without one, every channel of `source` reaches `target`."""
    downstream = forward_closure(source, index.order[target], index)
    if target not in downstream:
        return True
    between = backward_closure([target], lambda n: n in downstream)
    return any(op_name(n) in _SELECT_OPS for n in between)


_EXPERT_GATHER = frozenset({"index_add", "index_add_"})
"""Ops that put routed experts' outputs back in token order (into zeros), walked through to reach the experts."""


def read_attention(op: AttentionOp, index: GraphIndex, linears: dict[str, LinearSite], norms: frozenset[str],
                   memo: dict[fx.Node, Any], experts: dict[str, ExpertSite] | None = None) -> AttentionReading:
    """Find q/k/v projections (walking back), the output projection (walking forward) and fused slices. An
    operand no linear-like module feeds may come from stacked experts (JetMoE's mixture of attention heads: the
    query from routed expert weights): the experts' parameter gets that role, over its whole width."""
    operands = {"attention.query": op.query, "attention.key": op.key, "attention.value": op.value}
    hits: dict[str, tuple[str, fx.Node]] = {}
    found: dict[str, list[tuple[str, fx.Node]]] = {}
    scope = op.owner
    for scope in attention_scopes(op.owner, index.trace):
        found = {role: linears_behind(node, scope, index, linears, norms) for role, node in operands.items()}
        hits = {role: h[0] for role, h in found.items() if h}
        if hits:
            break
    output = linear_after(op.output, scope, index, linears)
    met: dict[str, list[fx.Node]] = {}  # path -> the nodes where its output was met
    roles: dict[str, set[str]] = {}
    for role, role_hits in found.items():
        for path, node in role_hits:  # every projection feeding the operand (MLA: k from two of them)
            roles.setdefault(path, set()).add(role)
            met.setdefault(path, []).append(node)
    slices: dict[str, dict[str, Slices]] = {}
    for path, path_roles in list(roles.items()):
        qkv = sorted(r for r in path_roles if r in operands)
        width = linears[path].out_features
        source = next((n for n in met[path] if tensor_val(n) is not None
                       and int(tensor_val(n).shape[-1]) == width), None)
        if source is None or (len(qkv) == 1 and not _selects_between(source, operands[qkv[0]], index)):
            continue
        barrier = frozenset(linears) - {path}  # channels reach an operand directly, not through another projection
        probe = channel_probe(index, source, {r: [operands[r]] for r in qkv}, barrier=barrier)
        kept = {r: probe[r] for r in qkv if probe.get(r)}
        if not kept:
            continue
        roles[path] = set(kept)
        if len(kept) > 1 or next(iter(kept.values())) != ((0, width),):
            slices[path] = kept  # a fused projection, or one whose other channels feed no operand (an output gate)
    hits = {role: next(((p, n) for p, n in h if role in roles.get(p, ())), h[0]) for role, h in found.items() if h}
    by_module = {e.module: e for e in (experts or {}).values()}
    for role, node in operands.items() if by_module else ():
        if not found.get(role):
            for module, _ in linears_behind(node, scope, index, by_module, norms, _EXPERT_GATHER):
                roles.setdefault(by_module[module].path, set()).add(role)
    if output is not None:
        roles.setdefault(output, set()).add("attention.output")

    def channels(role: str) -> int | None:
        if role not in hits or sum(role in roles.get(p, ()) for p, _ in found.get(role, ())) > 1:
            return None  # no projection, or several (MLA's key): the operand's shape tells the heads
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
    if "attention.query" in hits and "attention.key" in hits:  # q and k read different sequences
        def inputs(role: str) -> list[fx.Node]:
            return [module_input(linears[p], index) for p, _ in found[role] if role in roles.get(p, ())]

        q_ins, k_ins = inputs("attention.query"), inputs("attention.key")
        cross = not any(qi is ki for qi in q_ins for ki in k_ins) \
            and not any(depends(op.query, ki, scope, index) for ki in k_ins) \
            and not any(depends(op.key, qi, scope, index) for qi in q_ins)
    info = AttentionInfo(
        implementation=op.implementation,
        query=hits.get("attention.query", (None,))[0], key=hits.get("attention.key", (None,))[0],
        value=hits.get("attention.value", (None,))[0], output=output,
        num_heads=heads(channels("attention.query"), head_dim, q),
        num_kv_heads=heads(channels("attention.key"), head_dim, k),
        head_dim=head_dim, cross=cross, causal=read_causal(op, index, memo),
        hidden_size=linears[hits["attention.key"][0]].in_features if "attention.key" in hits else None)
    return AttentionReading(op.owner, info, {p: frozenset(r) for p, r in roles.items()}, slices)
