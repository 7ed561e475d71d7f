"""`surgery.combine`: a new attachment made from a weighted combination of existing ones (the method does the
maths, e.g. LoRA's linear and rank-concatenating combinations)."""
from __future__ import annotations

import math

from torch import nn

from surgery.core.registry import manager
from surgery.engine.ledger import Attachment, require_ledger, unwrap
from surgery.engine.passes import attach, detach, set_active
from surgery.engine.transaction import check_name, model_lock
from surgery.errors import LedgerError
from surgery.rules.schema import Rule, RuleSet, Selector


def combine(model: nn.Module, weights: dict[str, float], name: str, how: str = "cat") -> Attachment:
    """Attach `name`, the weighted combination of the attachments in `weights` (name -> weight). They must
    place the same methods on the same sites and roles. `how` is the method's: for LoRA "cat" (ranks
    concatenated: exactly the weighted sum of the updates) or "linear" (A and B averaged; equal ranks).

    The result becomes the only active attachment, so the update does not act twice: the sources (and any other
    attachment) stay attached but idle until `set_active` says otherwise. Sources must not be merged."""
    model = unwrap(model)
    check_name(name)
    with model_lock(model):
        return _combine(model, weights, name, how)


def _combine(model: nn.Module, weights: dict[str, float], name: str, how: str) -> Attachment:
    ledger = require_ledger(model)
    if not weights:
        raise LedgerError("combine needs at least one attachment")
    bad = {n: w for n, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        raise LedgerError(f"combine: weights must be finite numbers; got {bad}")
    sources = [ledger.get(n) for n in weights]
    merged = [a.name for a in sources if a.merged is not None]
    if merged:
        raise LedgerError(f"cannot combine {', '.join(map(repr, merged))} while merged into the weights (the update "
                          "would act twice); unmerge first")
    layout = [(p.site.path, p.method, p.roles) for p in sources[0].plan.placements]
    for other in sources[1:]:
        if [(p.site.path, p.method, p.roles) for p in other.plan.placements] != layout:
            raise LedgerError(f"cannot combine {sources[0].name!r} and {other.name!r}: they adapt different sites, roles or methods")
    registry = manager()
    rules, states = [], {}
    for placement in sources[0].plan.placements:
        path = placement.site.path
        params, state = registry.method(placement.method).combine(
            placement.site, [a.branches[path] for a in sources], list(weights.values()), how)
        selector = Selector(paths=[path], roles=sorted(placement.roles) or None)
        rules.append(Rule(select=selector, method=placement.method, params=params))
        states[path] = state
    ruleset = RuleSet(name=f"combine:{name}", description=f"{how} combination of {dict(weights)}", rules=rules)
    attachment = attach(model, ruleset, name=name)
    try:
        for path, branch in attachment.branches.items():
            branch.load_state_dict(states[path])
        set_active(model, [name])  # all-or-nothing itself; if it refuses, the new attachment goes again
    except BaseException:
        detach(model, name)
        raise
    return attachment
