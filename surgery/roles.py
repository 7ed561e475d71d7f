"""Roles of a model's sites, read from dataflow (never from module names): the graph analysis entry point.

`analyze(model)` traces a depth-reduced view of the model (one block per distinct structure), reads linear-like
sites, embeddings, attention computations, MLPs, the token embedding and the LM head from the graph, probes
fused projections for their exact channel ranges, and maps everything back to every block by canonical path.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .dataflow import (ACTIVATION_OPS, ELEMENTWISE_OPS, LAYOUT_OPS, GraphIndex, LinearSite, build_index,
                       embedding_sites, linear_sites, module_input, norm_modules, op_name, parent_path,
                       strip_layout, tensor_val, within)
from .depth import Reduction, reduced_depth, sharing, structure
from .graph_probe import Slices, channel_probe, evaluate
from .sites import AttentionInfo
from .tracing import AnalysisTrace, canonical_names, export_for_analysis

_MODULE_LIST = "torch.nn.modules.container.ModuleList"
_WALK_OPS = LAYOUT_OPS | ELEMENTWISE_OPS | ACTIVATION_OPS
_SCORE_OPS = frozenset({"mul", "mul_", "div", "div_", "add", "add_", "sub", "tanh", "to", "_to_copy", "where",
                        "masked_fill", "masked_fill_", "clamp", "dropout", "contiguous", "view", "reshape",
                        "type_as", "float"})
_PROB_OPS = frozenset({"to", "_to_copy", "dropout", "type_as", "contiguous", "clone", "float", "view", "reshape"})
_QK_MATMULS = frozenset({"matmul", "bmm", "baddbmm"})


@dataclass(frozen=True)
class LinearFacts:
    """Shape of a linear-like site; `transposed` = weight stored [in, out] (GPT-2 Conv1D layout)."""

    in_features: int
    out_features: int
    transposed: bool


@dataclass(frozen=True)
class EmbeddingFacts:
    """Shape of an embedding site."""

    num_embeddings: int
    embedding_dim: int


@dataclass(frozen=True)
class GraphFacts:
    """Everything the graph says about a model's sites, keyed by canonical module path."""

    linears: dict[str, LinearFacts]
    embeddings: dict[str, EmbeddingFacts]
    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]  # fused projections only: role -> output-channel ranges
    attention: dict[str, AttentionInfo]  # path of the module owning each attention computation


# ---------------------------------------------------------------------------------------------- attention ops


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


def is_block(path: str, trace: AnalysisTrace) -> bool:
    """Whether the module at `path` is a member of a ModuleList (a repeated block)."""
    parent = parent_path(path)
    return parent is not None and trace.module_classes.get(parent) == _MODULE_LIST


def enclosing_block(path: str, trace: AnalysisTrace) -> str:
    """The nearest ModuleList member containing `path` (itself included), or the root ""."""
    current: str | None = path
    while current:
        if is_block(current, trace):
            return current
        current = parent_path(current)
    return ""


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
        if op_name(node) not in _WALK_OPS and owner not in norms:
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
        head_dim=head_dim, cross=cross, causal=read_causal(op, index, memo))
    return AttentionReading(op.owner, info, {p: frozenset(r) for p, r in roles.items()}, slices)


# ---------------------------------------------------------------------------------------------- MLP roles


@dataclass(frozen=True)
class MlpReading:
    """Roles (and fused gate/up slices) read from one down projection's input."""

    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]


def read_mlp(down: LinearSite, index: GraphIndex, linears: dict[str, LinearSite],
             norms: frozenset[str]) -> MlpReading | None:
    """If `down`'s input derives through an activation from one or two linear outputs of one hidden state,
    the MLP roles: act(gate(x)) * up(x) -> gate, up; act(up(x)) -> up; a fused gate_up is probed for slices."""
    scope = enclosing_block(down.path, index.trace)
    reached: dict[str, tuple[set[bool], fx.Node]] = {}
    act_inputs: list[fx.Node] = []
    seen, queue = {(down.x, False)}, deque([(down.x, False)])
    while queue:
        node, through_act = queue.popleft()
        owner = index.owner[node]
        if owner in linears and owner != down.path:
            reached.setdefault(owner, (set(), node))[0].add(through_act)
            continue
        if node.op != "call_function" or owner in norms or not within(owner, scope):
            continue
        name = op_name(node)
        inputs = [i for i in node.all_input_nodes if i in index.from_user]
        if name in ACTIVATION_OPS:
            act_inputs += inputs
            through_act = True
        elif name not in LAYOUT_OPS | ELEMENTWISE_OPS:
            continue
        for i in inputs:
            if (i, through_act) not in seen:
                seen.add((i, through_act))
                queue.append((i, through_act))
    gates = [p for p, (acts, _) in reached.items() if True in acts]
    plain = [p for p, (acts, _) in reached.items() if acts == {False}]
    if len(gates) != 1 or len(plain) > 1:
        return None
    gate = gates[0]
    down_roles = {down.path: frozenset({"mlp.down"})}
    if plain:
        if module_input(linears[gate], index) is not module_input(linears[plain[0]], index):
            return None
        return MlpReading({**down_roles, gate: frozenset({"mlp.gate"}), plain[0]: frozenset({"mlp.up"})}, {})
    acts, source = reached[gate]
    if acts == {True}:
        return MlpReading({**down_roles, gate: frozenset({"mlp.up"})}, {})
    probe = channel_probe(index, source, {"gate": act_inputs, "all": [down.x]})
    gate_set = _channel_set(probe.get("gate", ()))
    up_set = _channel_set(probe.get("all", ())) - gate_set
    if not gate_set or not up_set:
        return MlpReading({**down_roles, gate: frozenset({"mlp.up"})}, {})
    return MlpReading({**down_roles, gate: frozenset({"mlp.gate", "mlp.up"})},
                      {gate: {"mlp.gate": _as_ranges(gate_set), "mlp.up": _as_ranges(up_set)}})


def _channel_set(slices: Slices) -> set[int]:
    return {c for a, b in slices for c in range(a, b)}


def _as_ranges(channels: set[int]) -> Slices:
    out: list[tuple[int, int]] = []
    for c in sorted(channels):
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return tuple(out)


# ---------------------------------------------------------------------------------------------- whole graph


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
                                                 and op_name(user) in _WALK_OPS)
                if user not in seen and passable:
                    seen.add(user)
                    stack.append(user)
        if hit:
            heads.append(site.path)
    return heads


def _merge(roles: dict[str, set[str]], slices: dict[str, dict[str, Slices]],
           new_roles: dict[str, frozenset[str]], new_slices: dict[str, dict[str, Slices]]) -> None:
    for path, rs in new_roles.items():
        roles.setdefault(path, set()).update(rs)
    for path, by_role in new_slices.items():
        slices.setdefault(path, {}).update(by_role)


def read_facts(trace: AnalysisTrace) -> GraphFacts:
    """All facts of one trace, keyed by the traced model's canonical paths."""
    index = build_index(trace)
    linears = linear_sites(index)
    embeddings = embedding_sites(index)
    norms = norm_modules(index)
    roles: dict[str, set[str]] = {}
    slices: dict[str, dict[str, Slices]] = {}
    attention: dict[str, AttentionInfo] = {}
    memo: dict[fx.Node, Any] = {}
    for op in attention_ops(index):
        reading = read_attention(op, index, linears, norms, memo)
        attention.setdefault(reading.owner, reading.info)
        _merge(roles, slices, reading.roles, reading.slices)
    for site in linears.values():
        mlp = read_mlp(site, index, linears, norms)
        if mlp is not None:
            _merge(roles, slices, mlp.roles, mlp.slices)
    tokens = token_embeddings(index, embeddings.values())
    for path in tokens:
        roles.setdefault(path, set()).add("embedding.input")
    vocab = embeddings[tokens[0]].num_embeddings if tokens else None
    for path in lm_heads(index, linears, vocab, norms) if vocab else []:
        roles.setdefault(path, set()).add("lm_head")
    return GraphFacts(
        linears={p: LinearFacts(s.in_features, s.out_features, s.transposed) for p, s in linears.items()},
        embeddings={p: EmbeddingFacts(s.num_embeddings, s.embedding_dim) for p, s in embeddings.items()},
        roles={p: frozenset(r) for p, r in roles.items()}, slices=slices, attention=attention)


# ---------------------------------------------------------------------------------------------- expansion, cache


def expand_facts(facts: GraphFacts, reduction: Reduction, model: nn.Module) -> GraphFacts:
    """Facts of a depth-reduced trace, mapped to every block of `model` by canonical path."""
    canonical = canonical_names(model)

    def canon(path: str) -> str:
        try:
            return canonical.get(id(model.get_submodule(path)), path)
        except AttributeError:
            return path

    rank = {name: i for i, name in enumerate(canonical.values())}

    def ordered(table: dict[str, Any]) -> dict[str, Any]:
        return dict(sorted(table.items(), key=lambda item: rank.get(item[0], len(rank))))

    def spread(table: dict[str, Any]) -> dict[str, Any]:
        return ordered({canon(p2): v for p, v in table.items() for p2, _ in reduction.expand(p)})

    def pinned(path: str | None, picks: dict[str, int]) -> str | None:
        return None if path is None else canon(reduction.expand(path, picks)[0][0])

    attention = {}
    for path, info in facts.attention.items():
        for path2, picks in reduction.expand(path):
            attention[canon(path2)] = dataclasses.replace(
                info, query=pinned(info.query, picks), key=pinned(info.key, picks),
                value=pinned(info.value, picks), output=pinned(info.output, picks))
    return GraphFacts(linears=spread(facts.linears), embeddings=spread(facts.embeddings),
                      roles=spread(facts.roles), slices=spread(facts.slices), attention=ordered(attention))


def _inputs_key(args: tuple | None, kwargs: dict | None) -> tuple:
    if args is None and kwargs is None:
        return ("example_inputs",)
    leaves, spec = pytree.tree_flatten((tuple(args or ()), dict(kwargs or {})))
    return str(spec), tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)
                            for x in leaves)


def architecture_key(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> tuple:
    """A key equal for models of one architecture (structure, shapes, sharing, config, inputs), not object ids."""
    config = getattr(model, "config", None)
    config_key: Any = None
    if config is not None:
        try:
            config_key = (config.to_json_string(use_diff=False), getattr(config, "_attn_implementation", None))
        except Exception:
            config_key = repr(config)
    return type(model).__qualname__, structure(model), sharing(model), config_key, _inputs_key(args, kwargs)


_CACHE: dict[tuple, GraphFacts] = {}
_CACHE_SIZE = 32


def _copy(facts: GraphFacts) -> GraphFacts:
    return GraphFacts(dict(facts.linears), dict(facts.embeddings), dict(facts.roles),
                      {p: dict(s) for p, s in facts.slices.items()}, dict(facts.attention))


def _analyze_uncached(model: nn.Module, args: tuple | None, kwargs: dict | None) -> GraphFacts:
    reduction = Reduction({})
    try:
        with reduced_depth(model) as reduction:
            trace = export_for_analysis(model, args, kwargs)
        return expand_facts(read_facts(trace), reduction, model)
    except Exception:
        if not reduction.groups:
            raise
    return expand_facts(read_facts(export_for_analysis(model, args, kwargs)), Reduction({}), model)


def analyze(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> GraphFacts:
    """Trace `model` (inputs from `tracing.example_inputs` if none given) and read its sites and roles.

    Results are cached by architecture key; every call returns a fresh copy of the dicts.
    """
    key = architecture_key(model, args, kwargs)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _analyze_uncached(model, args, kwargs)
    return _copy(_CACHE[key])
