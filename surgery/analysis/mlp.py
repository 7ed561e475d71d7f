"""MLP roles from dataflow: gate, up and down projections read back from each down projection's input (a fused
gate_up is probed for its exact slices)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import fx

from surgery.analysis.dataflow import (
    ACTIVATION_OPS,
    ELEMENTWISE_OPS,
    LAYOUT_OPS,
    GraphIndex,
    LinearSite,
    enclosing_block,
    module_input,
    op_name,
    within,
)
from surgery.analysis.probes import Slices, channel_probe


@dataclass(frozen=True)
class MlpReading:
    """Roles (and fused gate/up slices) read from one down projection's input."""

    roles: dict[str, frozenset[str]]
    slices: dict[str, dict[str, Slices]]



def read_mlp(down: LinearSite, index: GraphIndex, linears: dict[str, LinearSite],
             norms: frozenset[str], exclude: frozenset[str] = frozenset()) -> MlpReading | None:
    """If `down`'s input derives through an activation from one or two linear outputs of one hidden state,
    the MLP roles: act(gate(x)) * up(x) -> gate, up; act(up(x)) -> up; a fused gate_up is probed for slices.
    Nothing when `down` or a linear it reads from is in `exclude` (poolers)."""
    if down.path in exclude:
        return None
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
    if exclude.intersection(reached):
        return None
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
