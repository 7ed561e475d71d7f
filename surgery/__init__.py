"""surgery: parameter-efficient fine-tuning by model surgery.

    import surgery
    print(surgery.inspect(model))                   # sites and their roles, read from the graph
    print(surgery.plan(model, "lora-qv"))           # what a rule set would do; touches nothing
    surgery.attach(model, "lora-qv", name="task_a")  # rewrite the live model in place
    surgery.merge(model, "task_a"); surgery.unmerge(model, "task_a")
    surgery.detach(model, "task_a")                  # the model is exactly what it was
"""
from surgery.analysis.report import Report
from surgery.core.hookspecs import hookimpl
from surgery.core.method import Branch, Method, MethodParams, WeightEdit
from surgery.core.registry import register_plugin
from surgery.core.sites import KINDS, ROLES, AttentionInfo, Site
from surgery.core.version import __version__
from surgery.engine.combine import combine
from surgery.engine.host import Host
from surgery.engine.jobs import Jobs, causal_lm_loss, jobs
from surgery.engine.merge import merge, unmerge
from surgery.engine.passes import (
                            TrainableCount,
                            active,
                            adapter_parameters,
                            attach,
                            bake,
                            detach,
                            disabled,
                            per_sample,
                            set_active,
                            trainable_parameters,
)
from surgery.engine.reading import inspect, plan
from surgery.errors import (
                            LedgerError,
                            NotMergeableError,
                            PluginError,
                            RuleFileError,
                            SiteError,
                            SurgeryError,
                            TraceError,
)
from surgery.io.adapter_files import AdapterFileError, MismatchError, load, save
from surgery.io.pretrained import register as _register_adapters_beside_saved_models
from surgery.rules.plan import Placement, Plan
from surgery.rules.schema import RoleOverride, Rule, RuleSet, Selector

_register_adapters_beside_saved_models()  # model.save_pretrained of an adapted model writes its adapters beside

__all__ = [
    "__version__", "inspect", "plan", "attach", "detach", "merge", "unmerge", "bake", "set_active", "active", "disabled", "save", "load",
    "per_sample", "combine", "jobs", "Jobs", "causal_lm_loss", "adapter_parameters",
    "trainable_parameters", "register_plugin", "hookimpl", "Method", "MethodParams", "Branch", "WeightEdit", "Host",
    "Report", "Plan", "Placement", "RuleSet", "Rule", "Selector", "RoleOverride", "Site", "AttentionInfo", "ROLES",
    "KINDS", "TrainableCount", "SurgeryError", "RuleFileError", "PluginError", "SiteError", "LedgerError",
    "NotMergeableError", "TraceError", "AdapterFileError", "MismatchError",
]
