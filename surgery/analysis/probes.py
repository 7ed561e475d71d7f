"""Running small pieces of an analysis graph on real CPU tensors: channel probes and mask reads.

Only the nodes of a region are executed, on tensors of the shapes the trace recorded. Region inputs that depend
only on constants are computed exactly; those that depend on parameters, buffers or user inputs are filled with
seeded random floats (integers: zeros, booleans: ones). Sizes computed from the data (tokens routed to each
expert) are computed from random router logits, consistently (`symbol_values`). No weights and no model are
needed. A region that still cannot run gives nothing, with an `AnalysisWarning` naming the module.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from surgery.analysis.dataflow import GraphIndex, alias_writes, backward_closure, op_name, tensor_val
from surgery.errors import AnalysisWarning

Slices = tuple[tuple[int, int], ...]
_CPU = torch.device("cpu")


UNBACKED_SIZE = 3
"""The size a probe gives a data-dependent dimension whose value it could not compute (`symbol_values`) and that
has no hint: any positive size reads the same channels, since channels are the last dimension."""

Symbols = Mapping[sympy.Symbol, int]


def unbacked(val: Any) -> set[sympy.Symbol]:
    """The data-dependent (unbacked) size symbols a node's value uses: in a tensor's shape, or a symbolic int."""
    if isinstance(val, (torch.Tensor, torch.SymInt)):
        return set(free_unbacked_symbols(val))
    if isinstance(val, (list, tuple)):
        return set().union(*(unbacked(v) for v in val)) if val else set()
    return set()


def size_value(size: Any, symbols: Symbols) -> int:
    """One size as an integer: a plain int, a symbolic size evaluated on `symbols`, else its hint, else
    UNBACKED_SIZE."""
    try:
        return int(size)
    except Exception:  # a data-dependent (unbacked) size: how many tokens an expert got
        expr = getattr(getattr(size, "node", None), "expr", None)
        if expr is not None and symbols:
            value = expr.xreplace({s: sympy.Integer(v) for s, v in symbols.items()})
            if value.is_number:
                return int(value)
        hint = getattr(getattr(size, "node", None), "hint", None)
        return int(hint) if isinstance(hint, int) else UNBACKED_SIZE


def concrete_shape(val: torch.Tensor, symbols: Symbols | None = None) -> tuple[int, ...]:
    """The shape as integers, data-dependent sizes evaluated on `symbols` (see `size_value`)."""
    return tuple(size_value(size, symbols or {}) for size in val.shape)


def _filled(val: Any, generator: torch.Generator, symbols: Symbols | None = None) -> Any:
    if isinstance(val, torch.Tensor):
        shape = concrete_shape(val, symbols)
        if val.is_floating_point() or val.is_complex():
            return torch.randn(shape, generator=generator)
        if val.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool)
        return torch.zeros(shape, dtype=val.dtype)
    if isinstance(val, torch.SymInt):
        return size_value(val, symbols or {})
    if isinstance(val, (list, tuple)):
        return type(val)(_filled(v, generator, symbols) for v in val)
    return val


_RANDOM_FROM = frozenset({"linear", "addmm", "mm", "matmul", "bmm", "einsum", "embedding", "grouped_mm",
                          "_grouped_mm", "grouped_mm_fallback"})
"""Ops whose floating-point outputs a symbol computation starts from, at random: the projections (a router's
logits) that the data-dependent sizes are computed from."""


def _defined(node: fx.Node, wanted: set[sympy.Symbol]) -> dict[sympy.Symbol, Any]:
    """The wanted symbols a node's value defines: a symbolic int that is one symbol (`.item()`, `.tolist()`), or a
    tensor dimension that is one (`nonzero`); each with how to read it from the node's real value."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt) and val.node.expr in wanted:
        return {val.node.expr: int}
    if isinstance(val, torch.Tensor):
        return {size.node.expr: (lambda t, d=d: int(t.shape[d])) for d, size in enumerate(val.shape)
                if isinstance(size, torch.SymInt) and size.node.expr in wanted}
    return {}


def symbol_values(index: GraphIndex, nodes: Iterable[fx.Node], generator: torch.Generator) -> dict[sympy.Symbol, int]:
    """Values for the data-dependent sizes (unbacked symbols) in the values of `nodes`, consistent with each other.

    The graph nodes that define them (an expert's token count read with `.tolist()`) are run from the nearest
    matmul or lookup outputs, filled at random (a router's logits), so the counts add up to the tokens routed,
    as the shapes built from them require. Raises where those nodes cannot run."""
    wanted: set[sympy.Symbol] = set()
    for node in nodes:
        wanted |= unbacked(node.meta.get("val"))
    if not wanted:
        return {}
    readers: dict[sympy.Symbol, tuple[fx.Node, Any]] = {}
    for node in index.nodes:
        if wanted - readers.keys():
            for symbol, read in _defined(node, wanted - readers.keys()).items():
                readers[symbol] = (node, read)
    if not readers:
        return {}
    definers = {node for node, _ in readers.values()}

    def computed(node: fx.Node) -> bool:  # run, rather than filled at random
        val = node.meta.get("val")
        random = isinstance(val, torch.Tensor) and val.is_floating_point() and op_name(node) in _RANDOM_FROM
        return node.op != "placeholder" and not random

    env = run_region(index, backward_closure(definers, computed), {}, generator)
    return {symbol: read(env[node]) for symbol, (node, read) in readers.items()}


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device):
        return _CPU
    if isinstance(value, torch.Tensor) and value.device != _CPU:
        return value.to(_CPU) if value.device.type != "meta" else value
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def _execute(node: fx.Node, env: Mapping[fx.Node, Any], index: GraphIndex) -> Any:
    if node.op == "placeholder":
        return index.trace.constants[node.name].to(_CPU)
    if node.op == "get_attr":
        value: Any = index.trace.graph_module
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    args = _on_cpu(fx.map_arg(node.args, lambda n: env[n]))
    kwargs = _on_cpu(fx.map_arg(node.kwargs, lambda n: env[n]))
    return node.target(*args, **kwargs)  # type: ignore[operator]


def run_region(index: GraphIndex, region: set[fx.Node], seed: Mapping[fx.Node, Any],
               generator: torch.Generator, symbols: Symbols | None = None) -> dict[fx.Node, Any]:
    """Execute `region` in graph order; `seed` gives values of some nodes, other inputs are computed or filled
    (data-dependent sizes from `symbols`)."""
    env: dict[fx.Node, Any] = dict(seed)
    external = _inputs_of(region) - env.keys()
    exact = backward_closure([e for e in external if e not in index.from_runtime],
                             lambda n: n not in index.from_runtime and n not in env)
    for node in sorted(exact, key=index.order.__getitem__):
        try:
            env[node] = _execute(node, env, index)
        except Exception:  # not computable here (e.g. a higher-order op): stand in a random value
            env[node] = _filled(node.meta.get("val"), generator, symbols)
    for node in sorted(external - exact, key=index.order.__getitem__):
        env[node] = _filled(node.meta.get("val"), generator, symbols)
    for node in sorted(region - env.keys(), key=index.order.__getitem__):
        env[node] = _execute(node, env, index)
    return env


def _inputs_of(region: set[fx.Node]) -> set[fx.Node]:
    return {i for n in region for i in n.all_input_nodes if i not in region}


def forward_closure(start: fx.Node, limit: int, index: GraphIndex) -> set[fx.Node]:
    """Nodes reachable forwards from `start`, up to graph position `limit`."""
    seen, stack = {start}, [start]
    while stack:
        for user in stack.pop().users:
            if user not in seen and index.order[user] <= limit:
                seen.add(user)
                stack.append(user)
    return seen


def forward_closure_within(start: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    """Nodes of `allowed` reachable forwards from `start` through `allowed` nodes only."""
    seen, stack = {start}, [start]
    while stack:
        for user in stack.pop().users:
            if user not in seen and user in allowed:
                seen.add(user)
                stack.append(user)
    return seen


def ranges(mask: torch.Tensor) -> Slices:
    """Contiguous runs of True in a 1-D boolean mask, as (start, stop) pairs."""
    out: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(mask.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    return tuple(out)


def channel_probe(index: GraphIndex, source: fx.Node, targets: Mapping[str, Sequence[fx.Node]],
                  seed: int = 0, barrier: frozenset[str] = frozenset()) -> dict[str, Slices]:
    """Which channels (last dim) of `source` each group of target nodes depends on, by a gradient probe.

    Executes only the nodes between `source` and the targets, with `source` a random leaf requiring grad, and
    backpropagates a random cotangent from each group separately. Nodes owned by a module in `barrier` are
    not followed (their values are random inputs): a channel that reaches a target only through one of them
    does not count.
    """
    val = tensor_val(source)
    all_targets = [t for group in targets.values() for t in group]
    if val is None or not all_targets:
        return {}
    limit = max(index.order[t] for t in all_targets)
    downstream = forward_closure(source, limit, index)
    if barrier:
        downstream = {n for n in downstream if index.owner[n] not in barrier} | {source}
        downstream = forward_closure_within(source, downstream)
    wanted = set(all_targets)
    written: dict[fx.Node, bool] = {}

    def allowed(node: fx.Node) -> bool:  # on a path from the source, or a tensor written in place from it
        if node in downstream or node in wanted:
            return True
        if node not in written:
            written[node] = node in index.from_user and any(
                isinstance(i, fx.Node) and i in downstream for w in alias_writes(node) for i in w.args[1:])
        return written[node]

    region = backward_closure(all_targets, allowed) - {source}
    for node in list(region):  # in-place writes into region tensors (or views of them) from the source's side
        views: list[fx.Node] = []
        for write in alias_writes(node, views):
            data = [i for i in write.args[1:] if isinstance(i, fx.Node) and i in downstream]
            if data:
                region |= {write, *views} | (backward_closure(data, lambda n: n in downstream) - {source})
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        try:
            symbols = symbol_values(index, [source, *region, *_inputs_of(region)], generator)
            leaf = torch.randn(concrete_shape(val, symbols), generator=generator, requires_grad=True)
            env = run_region(index, region, {source: leaf * 1.0}, generator, symbols)
        except Exception as exc:  # a region that cannot run on stand-in values: nothing read, and said so
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"surgery could not probe which output channels of {index.owner[source] or 'the model'} "
                          f"reach {', '.join(targets)} ({type(exc).__name__}: {reason}): its roles are read from "
                          "the graph's structure alone, without exact channel slices", AnalysisWarning, stacklevel=2)
            return {}
        found: dict[str, Slices] = {}
        for role, group in targets.items():
            outs = [env[t] for t in group if t in region or t is source]
            outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if not outs:
                found[role] = ()
                continue
            cotangents = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outs]
            (grad,) = torch.autograd.grad(outs, leaf, cotangents, retain_graph=True, allow_unused=True)
            if grad is None:
                found[role] = ()
                continue
            found[role] = ranges(grad.reshape(-1, grad.shape[-1]).abs().sum(0) != 0)
    return found


def _unpadded(val: Any) -> Any:
    """A user's attention mask as if nothing were padded: all ones (booleans: all True)."""
    if isinstance(val, torch.Tensor):
        shape = concrete_shape(val)
        return torch.ones(shape, dtype=val.dtype)
    return val


def evaluate(index: GraphIndex, node: fx.Node, seed: int = 0, masks: bool = False) -> Any | None:
    """The value of `node` computed on its own, or None where it depends on a user input or cannot be run.

    With `masks`, a node may depend on user inputs named like attention masks (`*mask*`), taken as unpadded (all
    ones), and on other integer user inputs (ids, taken as zeros): what a model's mask is for a full batch."""
    region = backward_closure([node], lambda n: n.op != "placeholder")
    users = {i for n in region for i in n.all_input_nodes if i.op == "placeholder" and i in index.from_user}
    seed_values: dict[fx.Node, Any] = {}
    for placeholder in users:
        val = placeholder.meta.get("val")
        if not masks or not isinstance(val, torch.Tensor):
            return None
        if "mask" in placeholder.name:
            seed_values[placeholder] = _unpadded(val)
        elif not val.is_floating_point():
            seed_values[placeholder] = torch.zeros(concrete_shape(val), dtype=val.dtype)
        else:
            return None
    try:
        with torch.no_grad():
            return run_region(index, region - users, seed_values, torch.Generator().manual_seed(seed))[node]
    except Exception:
        return None
