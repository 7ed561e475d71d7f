"""The graph analysis entry point: every fact about a model's sites, read from dataflow (never from module names).

`analyze(model)` traces a depth-reduced view of the model (one block per distinct structure), reads linear-like
sites, embeddings, attention computations, MLPs, the token embedding and the LM head from the graph, probes
fused projections for their exact channel ranges, and maps everything back to every block by canonical path.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from surgery.analysis.attention import attention_ops, read_attention
from surgery.analysis.dataflow import (
    LinearSite,
    build_index,
    embedding_sites,
    expert_sites,
    linear_sites,
    norm_modules,
)
from surgery.analysis.depth import Reduction, reduced_depth, sharing, structure
from surgery.analysis.heads import lm_heads, poolers, task_heads, token_embeddings
from surgery.analysis.mha import functional_mha, mha_stand_ins, parameter_paths, renamed, weight_paths
from surgery.analysis.mlp import read_mlp, routers
from surgery.analysis.probes import Slices
from surgery.analysis.tracing import AnalysisTrace, canonical_names, export_for_analysis
from surgery.core.sites import AttentionInfo


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
class ExpertFacts:
    """Stacked expert weights: `module` holds the parameter; `transposed` = stored [experts, in, out]."""

    module: str
    num_experts: int
    in_features: int
    out_features: int
    transposed: bool


@dataclass(frozen=True)
class GraphFacts:
    """Everything the graph says about a model's sites, keyed by canonical module path."""

    linears: dict[str, LinearFacts]
    embeddings: dict[str, EmbeddingFacts]
    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]  # fused projections only: role -> output-channel ranges
    attention: dict[str, AttentionInfo]  # path of the module owning each attention computation
    input_groups: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> first site reading its input
    experts: dict[str, ExpertFacts] = dataclasses.field(default_factory=dict)  # parameter path -> stacked experts


def input_groups(linears: dict[str, LinearSite]) -> dict[str, str]:
    """Linear-like sites that read one and the same tensor (q/k/v of one attention, gate/up of one MLP), each
    mapped to the first of its group in graph order. Sites that read a tensor alone are left out."""
    readers: dict[fx.Node, list[str]] = {}
    for path, site in linears.items():
        readers.setdefault(site.x, []).append(path)
    return {path: group[0] for group in readers.values() if len(group) > 1 for path in group}


def _union(a: Slices, b: Slices) -> Slices:
    channels = sorted({c for lo, hi in (*a, *b) for c in range(lo, hi)})
    out: list[tuple[int, int]] = []
    for c in channels:
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return tuple(out)


def _merge(roles: dict[str, set[str]], slices: dict[str, dict[str, Slices]],
           new_roles: dict[str, frozenset[str]], new_slices: dict[str, dict[str, Slices]]) -> None:
    for path, rs in new_roles.items():
        roles.setdefault(path, set()).update(rs)
    for path, by_role in new_slices.items():  # a site feeding several attention calls: the union of its channels
        current = slices.setdefault(path, {})
        for role, ranges in by_role.items():
            current[role] = _union(current.get(role, ()), ranges)


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
    experts = expert_sites(index)
    for op in attention_ops(index):
        reading = read_attention(op, index, linears, norms, memo, experts)
        attention.setdefault(reading.owner, reading.info)
        _merge(roles, slices, reading.roles, reading.slices)
    pooling = frozenset(poolers(index, linears, norms))
    attending = frozenset(p for p, r in roles.items() if any(x.startswith("attention.") for x in r))
    for site in [*linears.values(), *experts.values()]:  # a pooler or an attention projection is never MLP
        mlp = read_mlp(site, index, linears, norms, exclude=pooling | attending, experts=experts)
        if mlp is not None:
            _merge(roles, slices, mlp.roles, mlp.slices)
    for path in routers(index, linears):
        roles.setdefault(path, set()).add("mlp.router")
    tokens = token_embeddings(index, embeddings.values())
    for path in tokens:
        roles.setdefault(path, set()).add("embedding.input")
    vocab = embeddings[tokens[0]].num_embeddings if tokens else None
    for path in lm_heads(index, linears, vocab, norms) if vocab else []:
        roles.setdefault(path, set()).add("lm_head")
    for path in pooling:
        roles.setdefault(path, set()).add("pooler")
    for path in task_heads(index, linears, norms, taken={p for p, r in roles.items() if r}):
        roles.setdefault(path, set()).add("head")
    return GraphFacts(
        linears={p: LinearFacts(s.in_features, s.out_features, s.transposed,
                                getattr(s.x.meta.get("val"), "dtype", None)) for p, s in linears.items()},
        embeddings={p: EmbeddingFacts(s.num_embeddings, s.embedding_dim) for p, s in embeddings.items()},
        roles={p: frozenset(r) for p, r in roles.items()}, slices=slices, attention=attention,
        input_groups=input_groups(linears),
        experts={p: ExpertFacts(e.module, e.num_experts, e.in_features, e.out_features, e.transposed)
                 for p, e in experts.items()})


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
                      input_groups=ordered(groups),
                      experts={canon(p2): dataclasses.replace(e, module=pinned(e.module, picks))
                               for p, e in facts.experts.items() for p2, picks in reduction.expand(p)})


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
_ON_VALUES: dict[tuple, str] = {}
"""Keys whose facts were traced on the inputs' values (a branch on the data): the digest of those values."""


def values_digest(args: tuple | None, kwargs: dict | None) -> str:
    """A digest of the input tensors' values (and of everything else the inputs hold)."""
    digest = hashlib.sha256()
    for leaf in pytree.tree_leaves((tuple(args or ()), dict(kwargs or {}))):
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
            digest.update(f"meta{leaf.dtype}{tuple(leaf.shape)}".encode())  # no values
        elif isinstance(leaf, torch.Tensor):
            flat = leaf.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(leaf.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def _copy(facts: GraphFacts) -> GraphFacts:
    return GraphFacts(dict(facts.linears), dict(facts.embeddings), dict(facts.roles),
                      {p: dict(s) for p, s in facts.slices.items()}, dict(facts.attention), dict(facts.input_groups),
                      dict(facts.experts))


def _analyze_uncached(model: nn.Module, args: tuple | None, kwargs: dict | None) -> tuple[GraphFacts, bool]:
    """The facts, and whether the trace took a branch on the inputs' values (`AnalysisTrace.on_values`)."""
    reduction = Reduction({})
    failed = None
    try:
        with reduced_depth(model) as reduction, mha_stand_ins(model) as mha, functional_mha(model) as called:
            trace = export_for_analysis(model, args, kwargs)
        names = {**parameter_paths(mha), **weight_paths(called)}
        return expand_facts(renamed(read_facts(trace), names), reduction, model), trace.on_values
    except Exception as exc:
        if not reduction.groups:
            raise
        failed = getattr(exc, "tried", None)  # surgery's own inputs failed: at full depth, stop if alike
    with mha_stand_ins(model) as mha, functional_mha(model) as called:
        trace = export_for_analysis(model, args, kwargs, failed=failed)
    names = {**parameter_paths(mha), **weight_paths(called)}
    return expand_facts(renamed(read_facts(trace), names), Reduction({}), model), trace.on_values


def analyze(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> GraphFacts:
    """Trace `model` (inputs from `tracing.example_inputs` if none given) and read its sites and roles.

    Results are cached by architecture key (and by the inputs' values where the trace branched on them); every
    call returns a fresh copy of the dicts.
    """
    key = architecture_key(model, args, kwargs)
    digest = values_digest(args, kwargs) if key in _ON_VALUES else None
    stale = key in _CACHE and digest is not None and _ON_VALUES[key] != digest
    if key not in _CACHE or stale:
        _CACHE.pop(key, None)
        if len(_CACHE) >= _CACHE_SIZE:
            _ON_VALUES.pop(next(iter(_CACHE)), None)
            _CACHE.pop(next(iter(_CACHE)))
        facts, on_values = _analyze_uncached(model, args, kwargs)
        _CACHE[key] = facts
        if on_values:
            _ON_VALUES[key] = digest if digest is not None else values_digest(args, kwargs)
        else:
            _ON_VALUES.pop(key, None)
    return _copy(_CACHE[key])
