"""The rule-file schema (pydantic v2) and loading rule sets from YAML, by name or path."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from surgery.core.registry import manager
from surgery.core.sites import KINDS, ROLES
from surgery.errors import RuleFileError

Role = Literal[ROLES]  # type: ignore[valid-type]
Kind = Literal[KINDS]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Selector(_Strict):
    """Which sites: every field given must match (AND); within a field any entry may match (OR).
    `paths` and `classes` are shell-style globs over the module path and the qualified class name
    (a class glob without a dot also matches the bare class name)."""

    roles: list[Role] | None = None
    kinds: list[Kind] | None = None
    paths: list[str] | None = None
    classes: list[str] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> "Selector":
        if all(v is None for v in (self.roles, self.kinds, self.paths, self.classes)):
            raise ValueError("a selector needs at least one of roles, kinds, paths, classes")
        return self


class Rule(_Strict):
    """Apply `method` with `params` to the sites that `select` matches and `exclude` does not.
    A rule that matches no site is an error unless it is `optional`."""

    select: Selector
    exclude: Selector | None = None
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    optional: bool = False


class RoleOverride(_Strict):
    """Declare a role the inference cannot read: every module whose path matches `path` (a glob) gets `role`,
    on the output channels `slices` ([[start, stop], ...]) if the module is a fused projection."""

    path: str
    role: Role
    slices: list[tuple[int, int]] | None = None

    @field_validator("slices")
    @classmethod
    def _ranges(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        for start, stop in v or []:
            if not 0 <= start < stop:
                raise ValueError(f"slice [{start}, {stop}] is not a range 0 <= start < stop")
        return v


class RuleSet(_Strict):
    """A rule file: a name, a description, optional role overrides and at least one rule."""

    name: str
    description: str = ""
    roles: list[RoleOverride] = Field(default_factory=list)
    rules: list[Rule] = Field(min_length=1)
    _source: str = PrivateAttr(default="<RuleSet>")

    @property
    def source(self) -> str:
        """Where this rule set came from: a file path, or `<RuleSet>` for one built in code."""
        return self._source


RuleSource = Union[str, Path, RuleSet]


def json_schema() -> dict[str, Any]:
    """The JSON schema of rule files, for editors (`surgery rules --schema`)."""
    return RuleSet.model_json_schema()


def _error_from_validation(source: str, err: ValidationError) -> RuleFileError:
    first = err.errors()[0]
    loc = list(first["loc"])
    problem, rule = first["msg"], None
    if len(loc) >= 2 and loc[0] in ("rules", "roles") and isinstance(loc[1], int):
        if loc[0] == "rules":
            rule = loc[1]
        else:
            problem = f"role override {loc[1]}: {problem}"
        loc = loc[2:]
    return RuleFileError(source, problem, rule=rule, field=".".join(map(str, loc)) or None)


def parse_ruleset(data: Any, source: str) -> RuleSet:
    """Validate already-loaded YAML data as a RuleSet; errors name `source`, the rule index and the field."""
    if not isinstance(data, dict):
        raise RuleFileError(source, "a rule file must be a mapping with 'name' and 'rules'")
    try:
        ruleset = RuleSet.model_validate(data)
    except ValidationError as err:
        raise _error_from_validation(source, err) from None
    ruleset._source = source
    return ruleset


def read_ruleset(path: str | Path) -> RuleSet:
    """Load and validate one rule file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RuleFileError(str(path), f"cannot read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RuleFileError(str(path), f"not valid YAML: {err}") from None
    return parse_ruleset(data, str(path))


def builtin_rulesets() -> dict[str, RuleSet]:
    """Every rule set that the installed plugins' rule directories provide, by name. Directories are read in pluggy's
    call order; a name declared twice is an error naming both files, unless the first one's plugin takes
    precedence by pluggy's ordering (`tryfirst`, or the other's `trylast`): then the first one is used."""
    registry = manager()
    found: dict[str, RuleSet] = {}
    for directory in registry.rule_dirs():
        for path in sorted(Path(directory).glob("*.yaml")):
            ruleset = read_ruleset(path)
            earlier = found.get(ruleset.name)
            if earlier is None:
                found[ruleset.name] = ruleset
            elif not registry.overrides(Path(earlier.source).parent, Path(directory)):
                raise RuleFileError(str(path), f"rule set name {ruleset.name!r} is also declared by {earlier.source}")
    return found


def resolve_ruleset(source: RuleSource) -> RuleSet:
    """A RuleSet object as is, a path to a YAML file, or the name of a rule set that a plugin provides."""
    if isinstance(source, RuleSet):
        return source
    if isinstance(source, dict):
        return parse_ruleset(source, "<dict>")
    text = str(source)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return read_ruleset(text)
    known = builtin_rulesets()
    if text not in known:
        raise RuleFileError(text, f"no rule file and no rule set of that name; known rule sets: {', '.join(sorted(known))}")
    return known[text]


def dump_schema(path: str | Path) -> None:
    """Write the JSON schema of rule files to `path`."""
    Path(path).write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")
