"""What the PEFT mappings share: PEFT's key prefix, option refusal, target and pattern lookup, tensor grouping."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from surgery.plugin import AdapterFileError, MismatchError, Pattern, PatternError, Site, SurgeryError

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


MAX_PATTERNS = 10_000
"""Most keys a `rank_pattern` or `alpha_pattern` may have."""


class PeftConfig(BaseModel):
    """The fields of a PEFT `adapter_config.json` that the mappings read, validated strictly whatever the type (no
    coercion: an integer is a valid float, nothing else; finite numbers; patterns that `Pattern` can match in
    linear time). Other fields are allowed; each mapping refuses the options it cannot express by name."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    peft_type: str
    r: int = Field(8, ge=0)
    lora_alpha: float = 8.0
    alpha: float = 8.0
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    eps: float = Field(6e-5, ge=0.0)
    d_initial: float = 0.1
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    coft: bool = False
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, ge=0, le=1000)
    oft_block_size: int = Field(0, ge=0)
    adapter_len: int = Field(1, gt=0)
    adapter_layers: int = Field(1, gt=0)
    projection_prng_key: int = Field(0, ge=0, lt=1 << 63)
    save_projection: bool = True
    decompose_both: bool = False
    decompose_factor: int = -1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict | None, info: Any) -> dict | None:
        if value is None:
            return value
        if len(value) > MAX_PATTERNS:
            raise ValueError(f"more than {MAX_PATTERNS:,} keys")
        for key, number in value.items():
            if info.field_name == "rank_pattern" and number <= 0:
                raise ValueError(f"rank {number} for {key!r} is not positive")
            Pattern(rf"(?:.*\.)?(?:{key})")  # refused now if it cannot be matched in linear time
        return value

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _targets(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str) and value != "all-linear":
            Pattern(value)
        return value


_TYPE_TAG = re.compile(r"^(list|dict|str|int|float|bool|none|literal|function-[a-z]+)(\[.*\])?$")
"""The member of a union that pydantic adds to an error's location (`target_modules.list[str]`): not a field."""


def validate_config(config: dict[str, Any], path: Any) -> None:
    """Refuse (`AdapterFileError` naming the file and field) a config whose known fields have the wrong type, a
    non-finite or out-of-range number, or a pattern outside what `Pattern` matches in linear time."""
    try:
        PeftConfig.model_validate(config)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not _TYPE_TAG.match(str(part)))
        got = repr(first.get("input"))[:80]
        raise AdapterFileError(f"{path}: field '{field}': {first['msg']} (got {got})") from None
    except PatternError as err:
        raise AdapterFileError(f"{path}: {err}") from None


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path as a regex anchored at a dotted suffix
    (`re.match(rf"(.*\\.)?({key})$", path)`), matched here in linear time (`Pattern`)."""
    for key, value in (patterns or {}).items():
        literal = Pattern(key).literal
        if literal is not None:
            if path == literal or path.endswith("." + literal):
                return value
        elif Pattern(rf"(?:.*\.)?(?:{key})").fullmatch(path):
            return value
    return default


def matches_target(path: str, targets: list[str]) -> bool:
    """PEFT's list form of `target_modules`: the path itself or a dotted suffix of it."""
    return any(path == t or path.endswith("." + t) for t in targets)


def selected(path: str, targets: list[str] | str | None) -> bool:
    """Whether PEFT's `target_modules` (or `exclude_modules`) names module `path`: a list names modules or dotted
    suffixes, a string is a regular expression over the whole path (matched in linear time)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return Pattern(targets).fullmatch(path)
    return matches_target(path, targets)


def target_problems(config: dict[str, Any], found: Any, sites: dict[str, Site], what: str,
                    kinds: frozenset[str] | None = None) -> list[str]:
    """`target_modules` (less `exclude_modules`) must name exactly the modules the file has `what` tensors for
    (of the site kinds the type adapts): a config naming k_proj beside tensors for q and v only is a mismatch."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    exclude, saved = config.get("exclude_modules"), config.get("modules_to_save") or []

    def targeted(path: str) -> bool:
        return selected(path, targets) and not selected(path, exclude)

    problems = [f"target_modules selects {p!r}, but {TENSORS} has no {what} tensors for it"
                for p in sorted(sites) if targeted(p) and p not in found and sites[p].kind != "attention"
                and (kinds is None or sites[p].kind in kinds) and not matches_target(p, saved)]
    problems += [f"{TENSORS} has {what} tensors for {p!r}, which target_modules does not select"
                 for p in sorted(found) if not targeted(p)]
    return problems


def glob_literal(path: str) -> str:
    """A glob that matches exactly `path` (module paths may hold glob characters)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


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
    return [{"select": {"paths": [glob_literal(x) for x in paths]}, "method": method, "params": p}
            for p, paths in groups.values()]


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
        problems += target_problems(config, found, sites, self.what, frozenset({"linear"}))
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
