"""PEFT's task types as an option of `attach`/`plan`: `task="sequence-classification"` or `"token-classification"`
adds to a rule set a trainable `copy` of the model's task head, found by its role (PEFT's `modules_to_save` for
SEQ_CLS / TOKEN_CLS). The head is every site with role `head`, plus each `pooler` that sits in the same parent module
as a head (RoBERTa's `classifier.dense` beside `classifier.out_proj`; BERT's own `bert.pooler` stays frozen, as PEFT
leaves it)."""
from __future__ import annotations

from surgery.analysis.report import Report
from surgery.errors import RuleFileError
from surgery.rules.plan import plan_sites
from surgery.rules.schema import Rule, RuleSet, Selector

TASKS = ("sequence-classification", "token-classification")
"""The task names `attach(..., task=...)` takes."""
ALIASES = {"SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification"}
"""PEFT's `task_type` names, accepted too."""


def task_name(task: str) -> str:
    """The canonical name of `task` (PEFT's names accepted), or a RuleFileError listing the known ones."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise RuleFileError(f"task={task!r}", f"unknown task; known: {', '.join(TASKS)} (or PEFT's {', '.join(ALIASES)})")
    return name


def task_of(ruleset: RuleSet) -> str | None:
    """PEFT's `task_type` for a rule set that `with_task` made (SEQ_CLS, TOKEN_CLS), else None."""
    suffix = ruleset.name.rpartition("+")[2]
    return next((peft for peft, name in ALIASES.items() if name == suffix and "+" in ruleset.name), None)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def head_paths(report: Report) -> list[str]:
    """The sites that make up the model's task head, in model order: role `head`, and poolers beside a head."""
    heads = [s.path for s in report.sites if "head" in s.roles]
    parents = {_parent(p) for p in heads}
    return [s.path for s in report.sites
            if s.path in heads or ("pooler" in s.roles and _parent(s.path) in parents)]


def with_task(ruleset: RuleSet, task: str, report: Report) -> RuleSet:
    """`ruleset` plus a rule that places `copy` on the task head's sites that its own rules leave free (a site
    they adapt keeps their method). Raises RuleFileError if the model has no task head."""
    name = task_name(task)
    heads = head_paths(report)
    if not heads:
        raise RuleFileError(f"task={task!r}", f"{report.model_class} has no site with role 'head' (a task head whose "
                                              "output is the model's); select the head by path in a rule with method 'copy'")
    taken = {p.site.path for p in plan_sites(ruleset, report, 0).placements}
    free = [p for p in heads if p not in taken]
    rules = list(ruleset.rules)
    if free:
        rules.append(Rule(select=Selector(paths=free), method="copy"))
    combined = RuleSet(name=f"{ruleset.name}+{name}", roles=ruleset.roles, rules=rules,
                       description=f"{ruleset.description}; plus a trainable copy of the task head ({name})".lstrip("; "))
    combined._source = ruleset.source
    return combined
