"""`surgery.inspect` and `surgery.plan` on a live model: an adapted model answers from its ledger (the sites as they
were before the first attach); any other model is analysed afresh. Neither changes the model."""
from __future__ import annotations

from torch import nn

from surgery.analysis.report import Report, sites_of
from surgery.core.method import base_parameter_count
from surgery.engine.ledger import find_ledger
from surgery.engine.transaction import TRACE_LOCK
from surgery.rules.plan import Plan, plan_sites
from surgery.rules.schema import RuleSource, resolve_ruleset
from surgery.rules.tasks import with_task


def inspect(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> Report:
    """The sites of `model` and their roles. For an adapted model, the sites of the model as it was before
    the first attach (the ledger keeps them). `args`/`kwargs`: example inputs, needed for non-HF modules."""
    ledger = find_ledger(model)
    if ledger is not None:
        return ledger.report
    with TRACE_LOCK:
        return sites_of(model, args, kwargs)


def plan(model: nn.Module, rules: RuleSource, args: tuple | None = None, kwargs: dict | None = None,
         task: str | None = None) -> Plan:
    """What `rules` (a rule-set name, a YAML path or a RuleSet) would do to `model`, with `task` as `attach` takes
    it. Changes nothing."""
    ruleset = resolve_ruleset(rules)
    report = inspect(model, args, kwargs)
    if task is not None:
        ruleset = with_task(ruleset, task, report)
    return plan_sites(ruleset, report, base_parameter_count(model))
