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

from .attention_graph import attention_ops, read_attention
from .dataflow import (ACTIVATION_OPS, ELEMENTWISE_OPS, LAYOUT_OPS, WALK_OPS, GraphIndex, LinearSite, build_index,
                       embedding_sites, enclosing_block, linear_sites, module_input, norm_modules, op_name,
                       strip_layout, within)
from .depth import Reduction, reduced_depth, sharing, structure
from .graph_probe import Slices, channel_probe
from .sites import AttentionInfo
from .tracing import AnalysisTrace, canonical_names, export_for_analysis


@dataclass(frozen=True)
class LinearFacts:
    """Shape of a linear-like site; `transposed` = weight stored [in, out] (GPT-2 Conv1D layout); `input_dtype`:
    the dtype of the activations its matmul takes (what a quantized layer computes in)."""

    in_features: int
    out_features: int
    transposed: bool
    input_dtype: torch.dtype | None = None


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
    input_groups: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> first site reading its input


def input_groups(linears: dict[str, LinearSite]) -> dict[str, str]:
    """Linear-like sites that read one and the same tensor (q/k/v of one attention, gate/up of one MLP), each
    mapped to the first of its group in graph order. Sites that read a tensor alone are left out."""
    readers: dict[fx.Node, list[str]] = {}
    for path, site in linears.items():
        readers.setdefault(site.x, []).append(path)
    return {path: group[0] for group in readers.values() if len(group) > 1 for path in group}


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
                                                 and op_name(user) in WALK_OPS)
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
        linears={p: LinearFacts(s.in_features, s.out_features, s.transposed,
                                getattr(s.x.meta.get("val"), "dtype", None)) for p, s in linears.items()},
        embeddings={p: EmbeddingFacts(s.num_embeddings, s.embedding_dim) for p, s in embeddings.items()},
        roles={p: frozenset(r) for p, r in roles.items()}, slices=slices, attention=attention,
        input_groups=input_groups(linears))


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
    groups = {}
    for path, first in facts.input_groups.items():
        for path2, picks in reduction.expand(path):
            groups[canon(path2)] = pinned(first, picks)
    return GraphFacts(linears=spread(facts.linears), embeddings=spread(facts.embeddings),
                      roles=spread(facts.roles), slices=spread(facts.slices), attention=ordered(attention),
                      input_groups=ordered(groups))


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
                      {p: dict(s) for p, s in facts.slices.items()}, dict(facts.attention), dict(facts.input_groups))


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
