"""MLP roles from dataflow: gate, up and down projections read back from each down projection's input (a fused
gate_up is probed for its exact slices), for linear modules and for stacked MoE expert weights alike."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import fx

from surgery.analysis.dataflow import (
    ACTIVATION_OPS,
    ELEMENTWISE_OPS,
    LAYOUT_OPS,
    ExpertSite,
    GraphIndex,
    LinearSite,
    enclosing_block,
    module_input,
    op_name,
    strip_layout,
    within,
)
from surgery.analysis.probes import Slices, channel_probe


@dataclass(frozen=True)
class MlpReading:
    """Roles (and fused gate/up slices) read from one down projection's input."""

    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]



def read_mlp(down: LinearSite | ExpertSite, index: GraphIndex, linears: dict[str, LinearSite],
             norms: frozenset[str], exclude: frozenset[str] = frozenset(),
             experts: dict[str, ExpertSite] | None = None) -> MlpReading | None:
    """If `down`'s input derives through an activation from one or two linear outputs of one hidden state,
    the MLP roles: act(gate(x)) * up(x) -> gate, up; act(up(x)) -> up; a fused gate_up is probed for slices.
    Stacked experts (`experts`, keyed by parameter path) are read the same way, each expert weight a site.
    Nothing when `down` or a linear it reads from is in `exclude` (poolers, attention projections)."""
    if down.path in exclude:
        return None
    experts = experts or {}
    expert_at = {node: path for path, site in experts.items() for node in site.matmuls}
    scope = enclosing_block(down.path, index.trace)
    reached: dict[str, tuple[set[bool], fx.Node]] = {}
    act_inputs: list[fx.Node] = []
    seen, queue = {(down.x, False)}, deque([(down.x, False)])
    while queue:
        node, through_act = queue.popleft()
        owner = index.owner[node]
        site = expert_at.get(node) or (owner if owner in linears else None)
        if site is not None and site != down.path:
            reached.setdefault(site, (set(), node))[0].add(through_act)
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
    if exclude.intersection(reached):
        return None
    gates = [p for p, (acts, _) in reached.items() if True in acts]
    plain = [p for p, (acts, _) in reached.items() if acts == {False}]
    if len(gates) != 1 or len(plain) > 1:
        return None
    gate = gates[0]
    down_roles = {down.path: frozenset({"mlp.down"})}
    if plain:
        if _input(gate, linears, experts, index) is not _input(plain[0], linears, experts, index):
            return None
        return MlpReading({**down_roles, gate: frozenset({"mlp.gate"}), plain[0]: frozenset({"mlp.up"})}, {})
    acts, source = reached[gate]
    if acts == {True}:
        return MlpReading({**down_roles, gate: frozenset({"mlp.up"})}, {})
    probe = channel_probe(index, source, {"mlp.gate": act_inputs, "mlp.down": [down.x]})
    gate_set = _channel_set(probe.get("mlp.gate", ()))
    up_set = _channel_set(probe.get("mlp.down", ())) - gate_set  # what reaches the down projection, ungated
    if not gate_set or not up_set:
        return MlpReading({**down_roles, gate: frozenset({"mlp.up"})}, {})
    return MlpReading({**down_roles, gate: frozenset({"mlp.gate", "mlp.up"})},
                      {gate: {"mlp.gate": _as_ranges(gate_set), "mlp.up": _as_ranges(up_set)}})



def _input(path: str, linears: dict[str, LinearSite], experts: dict[str, ExpertSite], index: GraphIndex) -> fx.Node:
    if path in linears:
        return module_input(linears[path], index)
    return strip_layout(experts[path].x, index)


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


_ROUTING_OPS = frozenset({"topk", "sort", "argsort", "argmax", "max", "kthvalue"})


def routers(index: GraphIndex, linears: dict[str, LinearSite]) -> set[str]:
    """Linear-like modules whose output chooses experts: it reaches a top-k/sort/argmax (through softmax, sigmoid,
    layout and element-wise ops) whose indices leave the block's own arithmetic. Role `mlp.router`."""
    passable = LAYOUT_OPS | ELEMENTWISE_OPS | ACTIVATION_OPS | {"softmax", "_softmax", "log_softmax", "_log_softmax"}
    found = set()
    for path, site in linears.items():
        seen, stack = {site.matmul}, [site.matmul]
        while stack and path not in found:
            for user in stack.pop().users:
                owner = index.owner[user]
                if user in seen or (owner in linears and owner != path):
                    continue
                name = op_name(user)
                if name in _ROUTING_OPS and _picks_indices(user):
                    found.add(path)
                    break
                if name in passable:
                    seen.add(user)
                    stack.append(user)
    return found


def _picks_indices(node: fx.Node) -> bool:
    """Whether a top-k/sort/max node's indices are used (not only its values, as a softmax's max subtraction)."""
    if op_name(node) in ("argsort", "argmax"):
        return True
    return any(op_name(u) == "getitem" and u.args[1] == 1 and u.users for u in node.users)
