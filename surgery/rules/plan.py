"""Plans: which method goes on which site with which params, from a rule set and a report. Touches nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from surgery.analysis.report import Report
from surgery.core.method import Method, MethodParams
from surgery.core.registry import manager
from surgery.core.sites import Site
from surgery.core.table import render
from surgery.errors import PluginError, RuleFileError, SiteError, SurgeryError
from surgery.rules.matcher import apply_role_overrides, selector_matches
from surgery.rules.schema import RuleSet


@dataclass(frozen=True)
class Placement:
    """One method on one site. `roles` are the selected roles the method acts on (their channel ranges on a
    fused projection); empty means the whole module."""

    site: Site
    method: str
    params: MethodParams
    roles: frozenset[str]
    rule: int
    trainable: int


@dataclass
class Plan:
    """The placements a rule set makes on one model, in model order. `str(plan)` is a table."""

    ruleset: RuleSet
    placements: list[Placement]
    total_parameters: int

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.placements)

    def __str__(self) -> str:
        rows = []
        for p in self.placements:
            params = ", ".join(f"{k}={v}" for k, v in p.params.model_dump().items() if v is not None)
            roles = ", ".join(sorted(p.roles)) or "(whole)"
            rows.append([p.site.path, p.site.kind, roles, p.method, params, f"{p.trainable:,}"])
        share = 100.0 * self.trainable / max(self.total_parameters, 1)
        footer = (f"rule set {self.ruleset.name!r}: {len(self.placements)} placements, "
                  f"{self.trainable:,} new trainable parameters ({share:.2f}% of {self.total_parameters:,})")
        return render(["site", "kind", "roles", "method", "params", "trainable"], rows, footer)


def _non_finite(raw: Any) -> str | None:
    """The dotted path of the first NaN or infinite number in `raw` (iteratively: any depth), or None."""
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value))
    return None


def _validate_params(ruleset: RuleSet, index: int, method_name: str, raw: dict) -> MethodParams:
    """The rule's params, validated strictly by the method's model: no coercion (`r: yes` or `r: "8"` is an
    error, an int is still a valid float) and no NaN or infinite number anywhere."""
    try:
        method = manager().method(method_name)
    except PluginError as err:
        raise RuleFileError(ruleset.source, str(err), rule=index, field="method") from None
    bad = _non_finite(raw)
    if bad is not None:
        raise RuleFileError(ruleset.source, "must be a finite number", rule=index, field=f"params.{bad}")
    try:
        return method.params.model_validate(raw, strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(["params", *map(str, first["loc"])])
        raise RuleFileError(ruleset.source, first["msg"], rule=index, field=field) from None


MAX_PLACEMENT_SHARE = 2
"""A placement may add at most this many times the parameters of the base model (or of its site's module, if
larger): a size bound checked before any branch is built, so `r: 1000000000` is refused, not allocated."""


def _check_size(ruleset: RuleSet, index: int, site: Site, method: str, trainable: int, total: int) -> None:
    own = (site.in_features or 0) * (site.out_features or 0) + (site.out_features or 0) * site.bias
    base = max(total, own)
    if base > 0 and trainable > MAX_PLACEMENT_SHARE * base:
        raise RuleFileError(ruleset.source, f"puts {method!r} on {site.path!r} with {trainable:,} new parameters, "
                            f"more than {MAX_PLACEMENT_SHARE} x the model's {base:,}: check its size params (rank, "
                            "bottleneck, number of virtual tokens, hidden sizes)", rule=index, field="params")


def _narrowed(ruleset: RuleSet, index: int, method: Method, hits: list[Site], params: MethodParams) -> list[Site]:
    """The sites of `hits` that the method adapts (`Method.narrow`), checked to be a subset in order."""
    if not hits:
        return hits
    try:
        kept = list(method.narrow(list(hits), params))
    except SurgeryError as err:
        raise RuleFileError(ruleset.source, str(err), rule=index, field="params") from None
    position = {s.path: i for i, s in enumerate(hits)}
    order = [position.get(s.path) for s in kept]
    if None in order or order != sorted(set(order)):
        raise PluginError(f"method {method.name!r}: narrow() must return a subset of the sites it is given, in order")
    return kept


def plan_sites(ruleset: RuleSet, report: Report, total_parameters: int) -> Plan:
    """Match every rule of `ruleset` against `report`'s sites."""
    registry = manager()
    sites = apply_role_overrides(report.sites, ruleset.roles, ruleset.source)
    chosen: dict[tuple[str, str], Placement] = {}
    for index, rule in enumerate(ruleset.rules):
        params = _validate_params(ruleset, index, rule.method, rule.params)
        method = registry.method(rule.method)
        hits = [s for s in sites if selector_matches(rule.select, s)
                and not (rule.exclude is not None and selector_matches(rule.exclude, s))]
        if not hits and not rule.optional:
            raise RuleFileError(ruleset.source, "matches no site of this model (mark it `optional: true` if that is expected)", rule=index)
        for site in hits:
            if site.kind not in method.kinds:
                raise RuleFileError(ruleset.source, f"selects {site.path!r} of kind {site.kind!r}, which method "
                                    f"{method.name!r} does not accept (it takes {', '.join(sorted(method.kinds))})", rule=index)
        hits = _narrowed(ruleset, index, method, hits, params)
        for site in hits:
            roles = frozenset(site.roles.intersection(rule.select.roles)) if rule.select.roles else frozenset()
            key = (site.path, method.name)
            other = next((p for (path, m), p in chosen.items() if path == site.path and m != method.name), None)
            if other is not None:
                raise RuleFileError(ruleset.source, f"puts {method.name!r} on {site.path!r}, where rule {other.rule} "
                                    f"already puts {other.method!r}; one rule set places one method per site "
                                    "(attach a second rule set under another name)", rule=index)
            if key in chosen:
                before = chosen[key]
                if before.params != params:
                    raise RuleFileError(ruleset.source, f"puts {method.name!r} on {site.path!r} with other params than rule {before.rule}", rule=index)
                roles = frozenset() if not roles or not before.roles else roles | before.roles
            try:
                trainable = method.count(site, params, roles)
            except SiteError as err:
                raise SiteError(f"{ruleset.source}, rule {index}, site {site.path!r}: {err}") from None
            _check_size(ruleset, index, site, method.name, trainable, total_parameters)
            chosen[key] = Placement(site, method.name, params, roles, chosen[key].rule if key in chosen else index,
                                    trainable)
    order = {s.path: i for i, s in enumerate(sites)}
    placements = sorted(chosen.values(), key=lambda p: (order[p.site.path], p.rule))
    return Plan(ruleset=ruleset, placements=placements, total_parameters=total_parameters)


