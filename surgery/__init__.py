"""surgery: parameter-efficient fine-tuning by model surgery.

    import surgery
    print(surgery.inspect(model))                   # sites and their roles, read from the graph
    print(surgery.plan(model, "lora-qv"))           # what a rule set would do; touches nothing
    surgery.attach(model, "lora-qv", name="task_a")  # rewrite the live model in place
    surgery.merge(model, "task_a"); surgery.unmerge(model, "task_a")
    surgery.detach(model, "task_a")                  # the model is exactly what it was
"""
from surgery.errors import (LedgerError, NotMergeableError, PluginError, RuleFileError, SiteError, SurgeryError,
                            TraceError)
from surgery.hookspecs import hookimpl
from surgery.host import Host
from surgery.inspection import Report, inspect
from surgery.method import Branch, Method, MethodParams, WeightEdit
from surgery.adapter_files import AdapterFileError, MismatchError, load, save
from surgery.combine import combine
from surgery.passes import (TrainableCount, active, attach, bake, detach, disabled, merge, per_sample, set_active,
                            trainable_parameters, unmerge)
from surgery.plan import Placement, Plan, plan
from surgery.registry import register_plugin
from surgery.rules import Rule, RoleOverride, RuleSet, Selector
from surgery.sites import KINDS, ROLES, AttentionInfo, Site

__version__ = "0.1.0"

__all__ = [
    "inspect", "plan", "attach", "detach", "merge", "unmerge", "bake", "set_active", "active", "disabled", "save", "load",
    "per_sample", "combine",
    "trainable_parameters", "register_plugin", "hookimpl", "Method", "MethodParams", "Branch", "WeightEdit", "Host",
    "Report", "Plan", "Placement", "RuleSet", "Rule", "Selector", "RoleOverride", "Site", "AttentionInfo", "ROLES",
    "KINDS", "TrainableCount", "SurgeryError", "RuleFileError", "PluginError", "SiteError", "LedgerError",
    "NotMergeableError", "TraceError", "AdapterFileError", "MismatchError",
]
