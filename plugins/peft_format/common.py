"""What the PEFT mappings share: PEFT's key prefix, option refusal, target and pattern lookup, tensor grouping."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.plugin import AdapterFileError, MismatchError, Site, SurgeryError

PREFIX = "base_model.model."
"""What PEFT puts before a module path in its tensor keys."""
CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"


def refuse(config: dict[str, Any], unsupported: dict[str, Any], source: str) -> None:
    """Refuse, by name, the options of `unsupported` (name -> the value that means "not used") that `config` sets;
    `source` is the adapter directory. Empty values (None, [], {}, False) count as unused, except for options whose
    unused value is a string."""
    refused = [f"{k}={config[k]!r}" for k, unused in unsupported.items()
               if config.get(k, unused) not in (unused, None, [], {}, False)
               or (isinstance(unused, str) and config.get(k, unused) != unused)]
    if refused:
        raise AdapterFileError(f"{source}/{CONFIG}: PEFT options surgery cannot map: {', '.join(refused)}")


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path as a regex anchored at a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def matches_target(path: str, targets: list[str]) -> bool:
    """PEFT's list form of `target_modules`: the path itself or a dotted suffix of it."""
    return any(path == t or path.endswith("." + t) for t in targets)


def unprefixed(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def by_site(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                              dict[str, torch.Tensor]]:
    """PEFT tensors `base_model.model.<path>.<name>` for each name of `names`, grouped by path; and the rest."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        short = unprefixed(key)
        name = next((n for n in names if short.endswith("." + n)), None)
        if name is None:
            rest[key] = tensor
        else:
            found.setdefault(short[:-len(name) - 1], {})[name] = tensor
    return found, rest


def site_problems(found: dict[str, dict[str, Any]], sites: dict[str, Site], what: str, kinds: frozenset[str],
                  rest: dict[str, torch.Tensor]) -> list[str]:
    """Mismatches of an adapter's sites with the model: missing or of a kind the mapping does not take, and
    tensors that belong to none."""
    problems = [f"missing site {p!r} ({what} in the adapter)" for p in found if p not in sites]
    problems += [f"site {p!r} is a {sites[p].kind} layer; PEFT's {what} adapts {', '.join(sorted(kinds))} layers"
                 for p in found if p in sites and sites[p].kind not in kinds]
    problems += [f"tensor {k!r} belongs to no {what} site and no module in modules_to_save" for k in rest]
    return problems


def grouped_rules(params: dict[str, dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """One rule per distinct params dict, selecting its sites by path (in path order)."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for path in sorted(params):
        key = repr(sorted(params[path].items()))
        groups.setdefault(key, (params[path], []))[1].append(path)
    return [{"select": {"paths": paths}, "method": method, "params": p} for p, paths in groups.values()]


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def most_common(values: dict[str, Any]) -> Any:
    """The value most sites have (PEFT's default, the others go into a pattern)."""
    return Counter(values.values()).most_common(1)[0][0]


def pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """`rank_pattern`/`alpha_pattern` for the sites whose value is not the default, keyed by exact path."""
    return {re.escape(p): v for p, v in values.items() if v != default}


def rank_alpha_fields(placements: list[Any]) -> dict[str, Any]:
    """PEFT's `r`, `alpha` and their per-module patterns: the most common value, and the sites that differ."""
    ranks = {p.site.path: p.params.r for p in placements}
    alphas = {p.site.path: p.params.alpha for p in placements}
    r, alpha = most_common(ranks), most_common(alphas)
    return {"r": r, "alpha": alpha, "rank_pattern": pattern(ranks, r), "alpha_pattern": pattern(alphas, alpha),
            "target_modules": sorted(ranks)}


def one_value(placements: list[Any], field: str) -> Any:
    """A param that PEFT holds once per adapter: the one value every placement has, or a SurgeryError."""
    values = {getattr(p.params, field) for p in placements}
    if len(values) != 1:
        raise SurgeryError(f"PEFT format: {field} is one value for the whole adapter; this attachment has "
                           f"{', '.join(map(repr, sorted(values, key=repr)))}")
    return values.pop()


def whole_module_only(placements: list[Any], method: str) -> None:
    """Refuse placements on role slices of a fused projection, which PEFT's non-LoRA types cannot hold."""
    for p in placements:
        if p.roles and any(r in p.site.slices for r in p.roles):
            raise SurgeryError(f"PEFT format: {method} on the {', '.join(sorted(p.roles))} slices of the fused "
                               f"projection {p.site.path!r} cannot be written (PEFT adapts whole modules); "
                               "select the module by path to adapt all of it")


class FactorMapping:
    """A PEFT type whose tensors are a method's branch parameters under the same names, per site, on whole
    nn.Linear modules (LoHa, LoKr, OFT): subclasses give the names, the refused options, and the params both ways."""

    peft_type: str
    methods: frozenset[str]
    method: str
    what: str  # for messages, e.g. "LoHa"
    names: tuple[str, ...]  # tensor names after `<module path>.`, as PEFT and the branch both call them
    unsupported: dict[str, Any]
    renames: ClassVar[dict[str, str]] = {}  # PEFT's name -> the branch's, where they differ

    def check(self, config: dict[str, Any], source: str) -> None:
        """Refuse what this type's config says that the method cannot do (beyond `unsupported`)."""

    def site_params(self, config: dict[str, Any], path: str, found: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def config_fields(self, placements: list[Any], attachment: Any) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: Any,
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        refuse(config, self.unsupported, source)
        self.check(config, source)
        sites = {s.path: s for s in report.sites if s.kind != "attention"}
        found, rest = by_site(tensors, self.names)
        problems = site_problems(found, sites, self.what, frozenset({"linear"}), rest)
        if problems:
            raise MismatchError(source, problems)
        params = {path: self.site_params(config, path, parts) for path, parts in found.items()}
        ours = {f"{path}.{self.renames.get(name, name)}": t for path, parts in found.items() for name, t in parts.items()}
        return grouped_rules(params, self.method), ours

    def write(self, model: nn.Module, attachment: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        placements = [p for p in attachment.plan.placements if p.method in self.methods]
        whole_module_only(placements, self.method)
        for p in placements:
            if p.site.kind != "linear":
                raise SurgeryError(f"PEFT format: PEFT's {self.what} adapts nn.Linear layers; {self.method} on "
                                   f"{p.site.kind} site {p.site.path!r} cannot be written")
        peft_name = {ours: theirs for theirs, ours in self.renames.items()}
        tensors = {f"{PREFIX}{p.site.path}.{peft_name.get(name, name)}": t.detach()
                   for p in placements for name, t in attachment.branches[p.site.path].named_parameters()}
        return self.config_fields(placements, attachment), tensors
