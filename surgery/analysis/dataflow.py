"""Dataflow facts of an analysis graph: op kinds, node owners, input dependence, linear-like and embedding sites.

Pure functions over an `AnalysisTrace`; nothing here looks at module names except to key facts by path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Container, Iterable

import torch
from torch import fx

from surgery.analysis.tracing import CALL_SUFFIX, AnalysisTrace

MATMUL_OPS = frozenset({"linear", "addmm", "mm", "matmul", "bmm"})
LAYOUT_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "transpose", "t", "numpy_T", "permute", "expand", "expand_as", "slice",
    "select", "getitem", "split", "split_with_sizes", "chunk", "unbind", "cat", "concat", "stack", "contiguous",
    "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "index", "index_select", "broadcast_to", "repeat",
    "repeat_interleave", "clone", "alias", "to", "_to_copy", "type_as", "movedim", "swapaxes", "lift_fresh_copy",
    "dropout", "feature_dropout", "alpha_dropout", "detach", "float", "half", "bfloat16", "pad", "constant_pad_nd",
    "unfold",
})
ELEMENTWISE_OPS = frozenset({
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "pow", "sqrt", "rsqrt", "exp",
    "log", "sin", "cos", "abs", "where", "masked_fill", "masked_fill_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "reciprocal", "square", "addcmul", "lerp", "copy_", "fill_",
})
ACTIVATION_OPS = frozenset({
    "silu", "silu_", "gelu", "gelu_", "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "softplus",
    "mish", "elu", "selu", "celu", "leaky_relu", "hardswish", "hardsigmoid", "hardtanh", "relu6", "erf", "glu",
    "prelu", "rrelu", "logsigmoid", "softsign",
})
NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
                      "batch_norm", "instance_norm", "rsqrt", "var", "std", "var_mean"})
TRANSPOSE_OPS = frozenset({"t", "numpy_T", "transpose", "mT", "adjoint", "swapaxes"})
WALK_OPS = LAYOUT_OPS | ELEMENTWISE_OPS | ACTIVATION_OPS
_MODULE_LIST = "torch.nn.modules.container.ModuleList"


def op_name(node: fx.Node) -> str:
    """The op's short name: `view` for aten.view.default, `getitem` for operator.getitem, else the target's name."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    return name


@dataclass(frozen=True)
class GraphIndex:
    """Per-node facts: topological order, owning module (canonical path, "" = root), input dependence."""

    trace: AnalysisTrace
    nodes: tuple[fx.Node, ...]
    order: dict[fx.Node, int]
    owner: dict[fx.Node, str]
    from_user: frozenset[fx.Node]  # depends on a user input
    from_state: frozenset[fx.Node]  # depends on a parameter or buffer
    from_runtime: frozenset[fx.Node]  # depends on a user input, parameter or buffer (else computable from constants)


def innermost_owner(node: fx.Node, trace: AnalysisTrace) -> str:
    """Canonical path of the innermost module in the node's `nn_module_stack` ("" when it has none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    fqn = CALL_SUFFIX.sub("", list(stack.values())[-1][0])
    return trace.module_paths.get(fqn, fqn)


def build_index(trace: AnalysisTrace) -> GraphIndex:
    """Index every node of the trace's graph."""
    nodes = tuple(trace.graph.nodes)
    user: set[fx.Node] = set()
    state: set[fx.Node] = set()
    runtime: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder":
            kind = trace.input_kinds.get(node.name, "user")
            if kind == "user":
                user.add(node)
            elif kind in ("parameter", "buffer"):
                state.add(node)
            if kind != "constant":
                runtime.add(node)
            continue
        inputs = node.all_input_nodes
        if any(i in user for i in inputs):
            user.add(node)
        if any(i in state for i in inputs):
            state.add(node)
        if any(i in runtime for i in inputs):
            runtime.add(node)
    return GraphIndex(trace=trace, nodes=nodes, order={n: i for i, n in enumerate(nodes)},
                      owner={n: innermost_owner(n, trace) for n in nodes}, from_user=frozenset(user),
                      from_state=frozenset(state), from_runtime=frozenset(runtime))


def within(path: str, scope: str) -> bool:
    """Whether module `path` is `scope` or lies inside it ("" is the root)."""
    return scope == "" or path == scope or path.startswith(scope + ".")


def parent_path(path: str) -> str | None:
    """The parent module's path, None for the root."""
    if path == "":
        return None
    return path.rpartition(".")[0]


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


def tensor_val(node: object) -> torch.Tensor | None:
    """The fake tensor a node stands for, if any."""
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


@dataclass(frozen=True)
class LinearSite:
    """A linear-like module as the graph shows it: first matmul node, its input and weight operands."""

    path: str
    in_features: int
    out_features: int
    transposed: bool
    matmul: fx.Node
    x: fx.Node
    weight: fx.Node


def _operands(node: fx.Node) -> tuple[object, object]:
    name = op_name(node)
    if name == "addmm":
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def _state_only(node: object, index: GraphIndex) -> bool:
    return isinstance(node, fx.Node) and node in index.from_state and node not in index.from_user


def stored_transposed(weight: fx.Node, index: GraphIndex) -> bool:
    """Whether the weight reaches the matmul through an odd number of transposes from its stored tensor."""
    flips, node = 0, weight
    while node.op == "call_function":
        if op_name(node) in TRANSPOSE_OPS or (op_name(node) == "permute" and _swaps_last_two(node)):
            flips += 1
        inputs = [i for i in node.all_input_nodes if i in index.from_state]
        if not inputs:
            break
        node = max(inputs, key=lambda i: tensor_val(i).numel() if tensor_val(i) is not None else -1)
    return flips % 2 == 1


def _swaps_last_two(node: fx.Node) -> bool:
    dims = list(node.args[1]) if len(node.args) > 1 else []
    n = len(dims)
    return n >= 2 and [d % n for d in dims] == list(range(n - 2)) + [n - 1, n - 2]


def weight_root(weight: fx.Node, index: GraphIndex) -> fx.Node:
    """The stored tensor a weight operand is a view or copy of (through layout ops, select/index of experts)."""
    node = weight
    while node.op == "call_function" and op_name(node) in LAYOUT_OPS:
        inputs = [i for i in node.all_input_nodes if i in index.from_state]
        if not inputs:
            break
        node = max(inputs, key=lambda i: tensor_val(i).numel() if tensor_val(i) is not None else -1)
    return node


def _stacked(weight: object, index: GraphIndex) -> bool:
    """Whether a weight operand comes from a parameter of three or more dimensions (stacked experts)."""
    if not isinstance(weight, fx.Node):
        return False
    root = weight_root(weight, index)
    val = tensor_val(root)
    return root.op == "placeholder" and val is not None and val.dim() >= 3


def _numel(node: fx.Node) -> int | None:
    val = tensor_val(node)
    try:
        return int(val.numel()) if val is not None else None
    except Exception:  # a data-dependent size
        return None


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs a node's result is data of: a matmul's first operand (not its weight), a norm's input (not its
    gain and bias), an element-wise op's full-size operands (not a broadcast scale or bias), else every input."""
    name = op_name(node)
    if name in MATMUL_OPS or name in NORM_OPS:
        first = _operands(node)[0] if name in MATMUL_OPS else node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else []
    inputs = list(node.all_input_nodes)
    if name in ELEMENTWISE_OPS | ACTIVATION_OPS and _numel(node) is not None:
        full = [i for i in inputs if _numel(i) == _numel(node)]
        return full or inputs
    return inputs


def learned_tokens(node: fx.Node, index: GraphIndex) -> bool:
    """Whether a value of no user input carries learned tokens, which a linear reading it makes a site.

    The rule: walking back from the value through its data inputs (`_data_inputs`: not a matmul's weight, not a
    norm's gain or bias, not a scale or bias broadcast onto the data), a parameter is reached: the tokens are
    that parameter's values, as BLIP-2's query tokens [1, n, d] through a layer norm and dropout, Perceiver's
    latents, a learned query vector [d] expanded over positions (Inkling 2's attention residuals). A value whose
    data are buffers or constants (Swin v2's relative-coordinate table, even through a linear, a ReLU or a norm
    with parameters of their own) carries none: a linear applied to it computes a table from constants and is no
    site."""
    if node not in index.from_state or node in index.from_user:
        return False
    return reaches_back(node, _data_inputs, index.from_state,
                        lambda placeholder: index.trace.input_kinds.get(placeholder.name) == "parameter")


def reaches_back(start: fx.Node, inputs: Callable[[fx.Node], Iterable[fx.Node]], within: Container[fx.Node],
            target: Callable[[fx.Node], bool]) -> bool:
    """Whether walking back from `start` along `inputs`, among the nodes `within`, reaches a placeholder that
    is a `target`."""
    seen, stack = {start}, [start]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            if target(current):
                return True
            continue
        for i in inputs(current):
            if i in within and i not in seen:
                seen.add(i)
                stack.append(i)
    return False


def _own_parameter(weight: object, path: str, index: GraphIndex) -> bool:
    """Whether a weight operand is a two-dimensional parameter of the module at `path` itself."""
    if not isinstance(weight, fx.Node):
        return False
    root = weight_root(weight, index)
    name = index.trace.parameters.get(root.name, "")
    val = tensor_val(root)
    return root.op == "placeholder" and val is not None and val.dim() == 2 and name.rpartition(".")[0] == path


def linear_sites(index: GraphIndex) -> dict[str, LinearSite]:
    """Leaf modules owning a matmul-type op with one user-dependent operand and one parameter-only operand, or with
    learned tokens (`learned_tokens`) multiplied by a 2-D parameter of the module itself."""
    sites: dict[str, LinearSite] = {}
    for node in index.nodes:
        if op_name(node) not in MATMUL_OPS:
            continue
        path = index.owner[node]
        if path in sites or path not in index.trace.leaves:
            continue
        a, b = _operands(node)
        if isinstance(a, fx.Node) and a in index.from_user and _state_only(b, index):
            x, weight, reversed_ = a, b, False
        elif op_name(node) != "linear" and isinstance(b, fx.Node) and b in index.from_user and _state_only(a, index):
            x, weight, reversed_ = b, a, True
        elif isinstance(a, fx.Node) and learned_tokens(a, index) and _own_parameter(b, path, index):
            x, weight, reversed_ = a, b, False  # a projection of learned tokens (Q-Former queries, latents)
        else:
            continue
        shape = tensor_val(weight).shape if tensor_val(weight) is not None else ()
        if len(shape) != 2 or _stacked(weight, index):  # one expert's slice of stacked weights: an expert site
            continue
        flipped = stored_transposed(weight, index)
        if op_name(node) == "linear" or reversed_:
            out_f, in_f, transposed = shape[0], shape[1], flipped
        else:
            in_f, out_f, transposed = shape[0], shape[1], not flipped
        sites[path] = LinearSite(path, int(in_f), int(out_f), transposed, node, x, weight)
    return sites


@dataclass(frozen=True)
class EmbeddingSite:
    """An embedding module as the graph shows it."""

    path: str
    num_embeddings: int
    embedding_dim: int
    lookups: tuple[fx.Node, ...]  # every aten.embedding node of this module


def embedding_sites(index: GraphIndex) -> dict[str, EmbeddingSite]:
    """Leaf modules owning an `aten.embedding` lookup, with the weight's shape."""
    found: dict[str, list[fx.Node]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for node in index.nodes:
        if op_name(node) != "embedding":
            continue
        path = index.owner[node]
        weight = tensor_val(node.args[0])
        if path not in index.trace.leaves or weight is None or weight.dim() != 2:
            continue
        found.setdefault(path, []).append(node)
        shapes[path] = (int(weight.shape[0]), int(weight.shape[1]))
    return {p: EmbeddingSite(p, *shapes[p], tuple(nodes)) for p, nodes in found.items()}


def norm_modules(index: GraphIndex) -> frozenset[str]:
    """Modules that normalise: owners of a layer/RMS-norm op or of an rsqrt/var reduction."""
    return frozenset(index.owner[n] for n in index.nodes if op_name(n) in NORM_OPS and index.owner[n])


def strip_layout(node: fx.Node, index: GraphIndex) -> fx.Node:
    """Walk back through single-input layout ops to the node a tensor is a view/copy of."""
    while op_name(node) in LAYOUT_OPS:
        inputs = [i for i in node.all_input_nodes if i in index.from_user]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def module_input(site: LinearSite, index: GraphIndex) -> fx.Node:
    """The value a linear-like module receives: its matmul input, before the module's own reshapes."""
    node = site.x
    while index.owner[node] == site.path and op_name(node) in LAYOUT_OPS:
        inputs = [i for i in node.all_input_nodes if i in index.from_user]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return strip_layout(node, index)


def reaches(start: fx.Node, goal: Callable[[fx.Node], bool], passable: Callable[[fx.Node], bool]) -> bool:
    """Whether a forward path from `start` through passable nodes reaches a node satisfying `goal`."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if goal(user):
                return True
            if user not in seen and passable(user):
                seen.add(user)
                stack.append(user)
    return False


def backward_closure(targets: Iterable[fx.Node], allowed: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """Every node reachable backwards from `targets` through allowed nodes (targets included)."""
    seen: set[fx.Node] = set()
    stack = [t for t in targets if allowed(t)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(i for i in node.all_input_nodes if i not in seen and allowed(i))
    return seen


VIEW_OPS = frozenset({"slice", "select", "view", "narrow", "transpose", "unsqueeze", "squeeze", "expand", "permute",
                      "as_strided", "_unsafe_view", "t", "alias", "unflatten", "diagonal", "unfold"})


def alias_writes(node: fx.Node, views: list[fx.Node] | None = None) -> list[fx.Node]:
    """In-place ops that write into `node` or into a view of it (`new_empty(...)[..., :d].copy_(k_nope)`). Their
    other operands are data that `node` carries afterwards. The views passed through are appended to `views`."""
    found: list[fx.Node] = []
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if not user.args or user.args[0] is not current:
                continue
            name = op_name(user)
            if name.endswith("_") and not name.startswith("_"):
                found.append(user)
            elif name in VIEW_OPS and user not in seen:
                seen.add(user)
                stack.append(user)
                if views is not None:
                    views.append(user)
    return found


EXPERT_MATMUL_OPS = MATMUL_OPS | frozenset({"grouped_mm_fallback", "_grouped_mm", "grouped_mm", "einsum"})


@dataclass(frozen=True)
class ExpertSite:
    """Stacked expert weights (one parameter [experts, out, in] or [experts, in, out]) used by batched or grouped
    matmuls. `path` is the parameter's path (module path + "." + parameter name), `module` its module's."""

    path: str
    module: str
    num_experts: int
    in_features: int
    out_features: int
    transposed: bool  # stored [experts, in, out]
    matmuls: tuple[fx.Node, ...]
    x: fx.Node

    @property
    def matmul(self) -> fx.Node:
        return self.matmuls[-1]


def _batched_over_first(node: fx.Node, weight_second: bool) -> bool:
    """Whether an einsum's weight operand is indexed by its first dimension in the input and the output alike
    (one product per expert), as in "ecd,edf->ecf"."""
    equation = node.args[0]
    if not isinstance(equation, str) or "->" not in equation:
        return False
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return False
    w_term, x_term = (terms[1], terms[0]) if weight_second else (terms[0], terms[1])
    first = w_term.lstrip(".")[:1]
    return bool(first) and first in x_term and first in output


def expert_sites(index: GraphIndex) -> dict[str, ExpertSite]:
    """Parameters of three dimensions multiplied with a user-dependent operand: stacked MoE experts, whether by
    `grouped_mm`, `bmm`/`matmul` or by a `linear` on one expert's slice (jetmoe). Keyed by parameter path."""
    found: dict[str, dict] = {}
    for node in index.nodes:
        name = op_name(node)
        if name not in EXPERT_MATMUL_OPS:
            continue
        if name == "einsum":
            listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            operands = node.args[1] if listed else node.args[1:]
            if len(operands) != 2:
                continue
            a, b = operands
        else:
            a, b = _operands(node)
        if isinstance(a, fx.Node) and a in index.from_user and _state_only(b, index):
            x, weight = a, b
        elif name not in ("linear", "einsum") and isinstance(b, fx.Node) and b in index.from_user \
                and _state_only(a, index):
            x, weight = b, a
        else:
            continue
        root = weight_root(weight, index)
        val = tensor_val(root)
        path = index.trace.parameters.get(root.name)
        if root.op != "placeholder" or val is None or val.dim() != 3 or path is None:
            continue
        if name == "einsum" and not _batched_over_first(node, weight is operands[1]):
            continue  # a projection by a 3-D weight (XLNet's "ibh,hnd->ibnd"), not one matmul per expert
        flips = stored_transposed(weight, index)
        experts, d1, d2 = (int(d) for d in val.shape)
        if name == "linear":  # x @ W.T, W = param[e] (a [out, in] slice unless transposed on the way)
            out_f, in_f, transposed = (d2, d1, True) if flips else (d1, d2, False)
        else:  # x @ W', W' [in, out]
            out_f, in_f, transposed = (d1, d2, False) if flips else (d2, d1, True)
        entry = found.setdefault(path, {"module": index.owner[node], "shape": (experts, in_f, out_f, transposed),
                                        "matmuls": [], "x": x})
        entry["matmuls"].append(node)
    return {p: ExpertSite(p, e["module"], e["shape"][0], e["shape"][1], e["shape"][2], e["shape"][3],
                          tuple(e["matmuls"]), e["x"]) for p, e in found.items()}
