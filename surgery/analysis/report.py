"""`surgery.inspect`: the sites of a model and their roles, from the graph analysis and the weight formats."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.analysis.facts import GraphFacts, analyze
from surgery.core import progress
from surgery.core.registry import manager
from surgery.core.sites import Site
from surgery.core.table import render


@dataclass
class Report:
    """The sites of one model. `str(report)` is a table; `report.sites` the list; `report.unknown` lists
    linear-like modules that no weight format recognises (no method can adapt them)."""

    model_class: str
    sites: list[Site]
    unknown: list[str] = field(default_factory=list)
    unknown_roles: dict[str, frozenset[str]] = field(default_factory=dict)  # roles read for unknown modules

    def site(self, path: str) -> Site:
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(f"no site at {path!r}")

    def with_role(self, role: str) -> list[Site]:
        return [s for s in self.sites if role in s.roles]

    def rows(self) -> list[list[str]]:
        out = []
        for s in self.sites:
            roles = []
            for r in sorted(s.roles):
                roles.append(f"{r}{list(s.slices[r])}" if r in s.slices else r)
            shape = f"{s.in_features}->{s.out_features}" if s.in_features is not None else ""
            if s.num_experts is not None:
                shape = f"{s.num_experts} x {s.in_features}->{s.out_features}"
            if s.attention is not None:
                a = s.attention
                shape = f"{a.implementation} h={a.num_heads} kv={a.num_kv_heads} d={a.head_dim}" + (" cross" if a.cross else "")
            dtype = str(s.dtype).replace("torch.", "") if s.dtype is not None else ""
            kind = s.kind + (f"[{s.format}]" if s.format else "")
            out.append([s.path, kind, shape, dtype, ", ".join(roles)])
        return out

    def __str__(self) -> str:
        footer = f"{len(self.sites)} sites in {self.model_class}"
        if self.unknown:
            named = [p + (f" ({', '.join(sorted(self.unknown_roles[p]))})" if self.unknown_roles.get(p) else "")
                     for p in self.unknown]
            footer += f"; linear-like but no weight format: {', '.join(named)}"
        return render(["site", "kind", "shape", "dtype", "roles"], self.rows(), footer)


def _module_class(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t.dtype
    return None


def _site_dtype(module: nn.Module, fmt, lin) -> torch.dtype | None:
    """A float layer's weight dtype; for a quantized layer (integer weights) the dtype its input activations
    have in the graph, which is what it computes in."""
    if fmt.kind == "quantized_linear" and getattr(lin, "input_dtype", None) is not None:
        return lin.input_dtype
    return _float_dtype(module)


def _parameter_index(model: nn.Module, path: str) -> int | None:
    """Where the parameter at `path` comes among its module's own parameters; None if `path` names no parameter."""
    owner, _, name = path.rpartition(".")
    try:
        names = list(dict(model.get_submodule(owner).named_parameters(recurse=False)))
    except AttributeError:
        return None
    return names.index(name) if name in names else None


def sites_of(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> Report:
    """Analyse `model` (never executing it) and return its sites."""
    with progress.task("analysing", unit="sites") as bar:
        facts = analyze(model, args, kwargs)
        bar.set_total(len(facts.linears) + len(facts.embeddings) + len(facts.experts) + len(facts.attention))
        return _sites(model, facts, bar)


def _sites(model: nn.Module, facts: GraphFacts, bar: progress.Task) -> Report:
    registry = manager()
    sites: list[Site] = []
    unknown: list[str] = []
    weights: dict[str, int] = {}
    for path, lin in facts.linears.items():
        bar.advance()
        if _parameter_index(model, path) is not None:  # a weight its module reads itself (nn.MultiheadAttention)
            owner = model.get_submodule(path.rpartition(".")[0])
            weights[path] = _parameter_index(model, path)
            sites.append(Site(path=path, kind="weight", module_class=_module_class(owner), in_features=lin.in_features,
                              out_features=lin.out_features, dtype=model.get_parameter(path).dtype,
                              roles=facts.roles.get(path, frozenset()), slices=facts.slices.get(path, {})))
            continue
        module = model.get_submodule(path)
        fmt = registry.format_of(module)
        if fmt is None or fmt.kind == "embedding" or tuple(fmt.features(module)) != (lin.in_features, lin.out_features):
            unknown.append(path)  # no format, or one whose reading of the module disagrees with the graph
            continue
        sites.append(Site(path=path, kind=fmt.kind, module_class=_module_class(module), in_features=lin.in_features,
                          out_features=lin.out_features, dtype=_site_dtype(module, fmt, lin),
                          bias=getattr(module, "bias", None) is not None,
                          roles=facts.roles.get(path, frozenset()), slices=facts.slices.get(path, {}),
                          format=fmt.name if fmt.kind == "quantized_linear" else None,
                          input_group=facts.input_groups.get(path)))
    for path, emb in facts.embeddings.items():
        bar.advance()
        module = model.get_submodule(path)
        fmt = registry.format_of(module)
        if fmt is None or fmt.kind != "embedding":
            continue
        sites.append(Site(path=path, kind="embedding", module_class=_module_class(module), in_features=emb.num_embeddings,
                          out_features=emb.embedding_dim, dtype=_float_dtype(module), roles=facts.roles.get(path, frozenset())))
    for path, ex in facts.experts.items():  # stacked MoE experts: a site per parameter
        bar.advance()
        module = model.get_submodule(ex.module)
        param = model.get_parameter(path)
        sites.append(Site(path=path, kind="experts", module_class=_module_class(module), in_features=ex.in_features,
                          out_features=ex.out_features, dtype=param.dtype, roles=facts.roles.get(path, frozenset()),
                          slices=facts.slices.get(path, {}), num_experts=ex.num_experts,
                          transposed=ex.transposed))
    for path, info in facts.attention.items():
        bar.advance()
        sites.append(Site(path=path, kind="attention", module_class=_module_class(model.get_submodule(path)), attention=info))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    within: dict[str, int] = {}
    for path in [*facts.experts, *weights]:  # a parameter sorts just after its module, in registration order
        order[path] = order.get(path.rpartition(".")[0], len(order))
        within[path] = _parameter_index(model, path) + 1
    sites.sort(key=lambda s: (order.get(s.path, len(order)), within.get(s.path, 0), s.kind, s.path))
    return Report(model_class=_module_class(model), sites=sites, unknown=unknown,
                  unknown_roles={p: facts.roles[p] for p in unknown if facts.roles.get(p)})


