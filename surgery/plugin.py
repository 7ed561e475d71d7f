"""The public API for plugin authors: everything a method, weight-format or adapter-format plugin may use.

A plugin imports `surgery` (the user API) and this module, nothing else of the engine; the built-in plugins in
`surgery_plugins` are held to the same rule by a test. The hooks themselves are specified, with their contracts,
in `surgery.core.hookspecs` (the plugin author's manual); mark implementations with `hookimpl`::

    from surgery import plugin

    class Scale(plugin.Method): ...

    @plugin.hookimpl
    def surgery_methods():
        return [Scale()]

Names here are stable: each one's docstring says what it is for.
"""
from __future__ import annotations

from torch import nn

from surgery.analysis.report import Report
from surgery.core.formats import AdapterFormat, PeftMapping, TraceStandIn, WeightFormat
from surgery.core.hookspecs import hookimpl, hookspec
from surgery.core.method import (
    DTYPES,
    Branch,
    Method,
    MethodParams,
    SlicedBranch,
    WeightEdit,
    branch_dtype,
    check_rank,
    first_float_dtype,
    input_of,
    module_device,
)
from surgery.core.registry import manager
from surgery.core.sites import KINDS, ROLES, AttentionInfo, Site
from surgery.core.versions import versions
from surgery.engine.host import group_numbers
from surgery.engine.ledger import Attachment, base_module, find_ledger, require_ledger, unwrap
from surgery.engine.reading import inspect
from surgery.errors import (
    AdapterFileError,
    LedgerError,
    MismatchError,
    NotMergeableError,
    PatternError,
    PluginError,
    RuleFileError,
    SiteError,
    SurgeryError,
)
from surgery.io.adapter_files import fill_branches, read_tensors
from surgery.io.atomic import write_directory
from surgery.io.bounded import SafetensorsHeader, TensorInfo, read_json, read_safetensors_header
from surgery.io.manifest import with_manifest
from surgery.io.model_card import with_model_card
from surgery.rules.patterns import Pattern
from surgery.rules.schema import RuleSet, parse_ruleset
from surgery.rules.tasks import task_of


def attachments(model: nn.Module) -> dict[str, Attachment]:
    """The attachments on `model` by name, in attachment order (empty if nothing is attached). Read-only: change
    them through the passes (`surgery.attach`, `surgery.detach`, ...)."""
    ledger = find_ledger(unwrap(model))
    return dict(ledger.attachments) if ledger is not None else {}


def attachment(model: nn.Module, name: str) -> Attachment:
    """The attachment `name` on `model` (its plan, and its branches by site path); `LedgerError` if there is none."""
    return require_ledger(unwrap(model)).get(name)


def weight_format(module: nn.Module) -> WeightFormat | None:
    """The weight format that reads `module`'s weight (the first installed one that `matches` it, as the analysis
    and merges pick it), or None. `weight_format(m).dense(m)` is its weight as dense [out, in]: a detached live
    view for float layers, a dequantized copy for quantized ones. For methods whose forward reads the base weight
    (DoRA's weight norm)."""
    return manager().format_of(module)


def peft_mappings() -> dict[str, PeftMapping]:
    """Every installed plugin's HF PEFT mappings (`surgery_peft_mappings`), by PEFT type (e.g. "LORA"). The `peft`
    adapter format reads a directory through the mapping of its `peft_type` and writes an attachment through the
    mapping whose `methods` hold its methods."""
    return dict(manager().peft_mappings)


__all__ = [
    # hooks
    "hookimpl", "hookspec",
    # methods: what a method plugin implements, and helpers for building branches
    "Method", "MethodParams", "Branch", "SlicedBranch", "WeightEdit", "DTYPES", "branch_dtype", "check_rank", "first_float_dtype",
    "module_device", "input_of", "versions", "group_numbers",
    # sites: what the analysis found, and the vocabulary of roles and kinds
    "Site", "AttentionInfo", "ROLES", "KINDS", "Report", "inspect",
    # formats: weight formats (quantized layers) and adapter file formats
    "WeightFormat", "weight_format", "TraceStandIn", "AdapterFormat", "read_tensors", "fill_branches", "write_directory",
    "read_json", "read_safetensors_header", "SafetensorsHeader", "TensorInfo", "Pattern",
    "with_manifest", "with_model_card", "PeftMapping", "peft_mappings",
    # what is attached
    "Attachment", "attachments", "attachment", "base_module",
    # rule sets
    "RuleSet", "parse_ruleset", "task_of",
    # errors
    "SurgeryError", "SiteError", "NotMergeableError", "PluginError", "RuleFileError", "LedgerError", "AdapterFileError",
    "MismatchError", "PatternError",
]
