"""The rule-file schema (pydantic v2) and loading rule sets from YAML, by name or path."""
from __future__ import annotations

import json
import os
import stat
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


RULE_FILE_LIMIT = 1 << 20
"""Largest rule file read (bytes)."""
YAML_NODES = 100_000
"""Most YAML nodes a rule file may expand to (aliases counted each time they are used)."""


class _RuleFileLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key that is not a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many nodes the document expands to, aliases counted every time (memoised: linear in the graph)."""
    sizes: dict[int, int] = {}
    order, stack, seen = [], [root], set()
    while stack:  # post-order without recursion
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    for node in reversed(order):
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), limit + 1) for c in children))
    return sizes[id(root)]


def load_yaml(text: str, source: str) -> Any:
    """YAML of a rule file, bounded: no duplicate keys, at most YAML_NODES nodes after alias expansion, and
    nesting the parser can take (deeper is refused, not a crash)."""
    loader = _RuleFileLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root, YAML_NODES) > YAML_NODES:
            raise RuleFileError(source, f"too large: more than {YAML_NODES:,} YAML nodes once aliases are expanded")
        return loader.construct_document(root)
    except yaml.YAMLError as err:
        raise RuleFileError(source, f"not valid YAML: {err}") from None
    except RecursionError:
        raise RuleFileError(source, "not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def read_ruleset(path: str | Path) -> RuleSet:
    """Load and validate one rule file (UTF-8 YAML of at most RULE_FILE_LIMIT bytes, a regular file)."""
    path = Path(path)
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise RuleFileError(str(path), "not a regular file")
            if info.st_size > RULE_FILE_LIMIT:
                raise RuleFileError(str(path), f"{info.st_size:,} bytes, more than the {RULE_FILE_LIMIT:,} a rule file may have")
            raw = f.read(RULE_FILE_LIMIT + 1)
    except OSError as err:
        raise RuleFileError(str(path), f"cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RuleFileError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_ruleset(load_yaml(text, str(path)), str(path))


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
