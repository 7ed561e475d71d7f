"""The plugin author's manual: every hook that surgery calls, what it takes, what it returns and when it runs.

A plugin is a module (or object) with functions marked `@surgery.hookimpl` (also `surgery.plugin.hookimpl`),
named as below. It imports `surgery` and `surgery.plugin` only: that is the whole public surface, and the
built-in plugins (`surgery_plugins`) use nothing else. Register it with an entry point in your package's
`pyproject.toml`::

    [project.entry-points.surgery]
    my_plugin = "my_package.my_plugin"

Loading: surgery registers every module of the `surgery` entry-point group on first use (the first
`surgery.inspect`, `plan`, `attach`, ...); `surgery.register_plugin(obj)` adds one at run time. A module that
fails to import is named in a `PluginError`.

Calling: every hook is called through pluggy (`pm.hook.<name>()`), so pluggy's rules hold. Implementations run
from the last registered to the first, `tryfirst=True` ones before and `trylast=True` ones after the rest, and
`wrapper=True` implementations see (and may change) what the others return: `results = yield` is the list of
the other implementations' return values, in call order. The call order is what decides between plugins
where it matters (weight formats, rule sets); each hook says how.

The hooks take no arguments and return lists; what they return is read once and cached until a plugin is
registered or unregistered. Return new objects or module-level ones; surgery never mutates them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from surgery.core.formats import AdapterFormat, PeftMapping, WeightFormat
    from surgery.core.method import Method

PROJECT = "surgery"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def surgery_methods() -> list["Method"]:
    """The adaptation methods this plugin provides.

    Returns: a list of `surgery.plugin.Method` instances (empty if none). A rule's `method:` names one by its
    `name`; two plugins offering one name is a `PluginError` naming both.

    Called: on the first use of a method (plan, attach, load, `surgery plugins`), once per process until the
    plugin set changes.

    A method declares `name`, `params` (a `MethodParams` pydantic model validating the rule's `params:`; unknown
    keys are refused), `kinds` (the site kinds it accepts, from `surgery.plugin.KINDS`) and `mergeable`. The
    engine calls:

    - `narrow(sites, params) -> sites` when planning (optional): of the sites one rule selected, those the method
      adapts (e.g. the top `adapter_layers` attention sites); default all.
    - `count(site, params, roles) -> int` when planning: the trainable parameters `build` would create.
    - `build(site, module, params, roles) -> Branch` on attach, once per placement, before the model is touched:
      a new `Branch` module holding the method's trainable tensors for one site. It must not modify `module` or
      the model (the engine installs the branch, and removes it again on detach or when an attach fails
      part-way). `roles` are the roles the rule selected on this site: on a fused projection act only on
      `site.channels(role)`; empty means the whole module. At a site of kind `experts` or `weight` (a parameter,
      `site.path` names it) `module` is the module holding the parameter, and the branch implements
      `adapt_weight` (the engine applies it to the parameter, see `surgery.plugin.Branch`).
    - `attach_model(model, branches) -> undo | None` on attach, once per method per attachment, after its branches
      are installed: a model-level change (a forward pre-hook extending the attention mask, linking branches
      that read one input, ...). The engine calls `undo()` on detach and when the attach fails later on.
    - `merge_edit(site, module, branch) -> WeightEdit` on `surgery.merge` (mergeable methods only): pure
      functions on the site's dense weight [out, in] ([experts, out, in] at an `experts` site; and optionally
      its bias) that fold the branch in and take it out again. The engine applies them through the site's
      weight format and keeps what makes unmerge bit-exact. Raise `NotMergeableError` to refuse (e.g. a zero scale that would make unmerge lossy); nothing
      has changed then.
    - `combine(site, branches, weights, how) -> (params, state)` on `surgery.combine` (optional).

    The `Branch` runs inside the engine's host module at its site. `adapt_call(args, kwargs)` may change the base
    module's inputs, `adapt_output(args, kwargs, out)` its output; with `replaces_base = True` the branch is
    called instead of the base; a branch that also sets `kept_when_merged = True` (a trained module copy) has no
    weight edit: merge leaves it running and bake puts its `baked_module()` in the base module's place.
    `branch.running` (set by the engine) says whether it runs now. Optional fast paths, each with the contract in
    its docstring in `surgery.plugin.Branch`: `fused_call` (base and branch in one go while the branch runs alone
    at its site) and `prepare_routes`/`route_output` (every sample of a per-sample-routed batch at once,
    `surgery.per_sample`; `route_call` the base with them). All state worth saving lives in the branch's
    parameters and persistent buffers: `surgery.save` writes its `state_dict`.
    """


@hookspec
def surgery_weight_formats() -> list["WeightFormat"]:
    """Weight formats: how to recognise a module kind and read or write its weight as dense [out, in].

    Returns: a list of objects satisfying `surgery.plugin.WeightFormat` (`name`, `kind`, `priority`, `is_view`,
    `matches`, `features`, `dense`, `store`, `snapshot`, `restore`; optionally `analysis_stand_in`, and
    `compute_dtype` with `compute_weight`).

    Called: when a model is analysed (`inspect`, `plan`, `attach`: each linear-like or embedding module gets the
    first format that `matches` it), and on merge/unmerge (to read and write the weight).

    Order: formats are tried by descending `priority`; among equal priorities, in pluggy's call order. So a
    plugin takes over a module kind from a built-in (priority 0) with a higher priority, or with the same
    priority and `@hookimpl(tryfirst=True)`.

    This is the hook for quantized linear layers: a format with `kind = "quantized_linear"` whose `matches`
    recognises the layer by its signature (integer weight, scale, bit width: duck typing, not class names) and
    whose `dense()`/`store()` dequantize and requantize. Sites it claims get kind `quantized_linear` and
    `site.format = format.name`. `analysis_stand_in(module)` returns a module `torch.export` can trace in its
    place (see `surgery.plugin.TraceStandIn`), used only when the model as it is cannot be traced.
    `compute_dtype(module)` and `compute_weight(module)` (dequantized per call, in that dtype) let a method
    compute a quantized layer's linear map itself, fused with its own (LoRA in training does).
    """


@hookspec
def surgery_adapter_formats() -> list["AdapterFormat"]:
    """Adapter file formats other than surgery's own, e.g. HF PEFT's.

    Returns: a list of objects satisfying `surgery.plugin.AdapterFormat`, each with a `name` (what
    `surgery.save(..., format=name)` takes; "surgery" is reserved) and three functions:

    - `detect(directory) -> bool`: whether `directory` holds an adapter of this format;
    - `load(model, directory, name) -> Attachment`: attach it (through `surgery.attach` and
      `surgery.plugin.fill_branches`, so the model is left unchanged if it does not fit);
    - `save(model, attachment, directory) -> Path`: write it (through `surgery.plugin.write_directory`; pass the
      files through `with_manifest` where the format has no checksum of its own, and `with_model_card`).

    Called: `surgery.load` asks each format's `detect` in pluggy's call order when the directory is not a
    surgery adapter, and checks the directory's `surgery_manifest.json` (if any) before the format's `load`;
    `surgery.save(format=...)` calls that format's `save`. Two formats of one name are a
    `PluginError`.
    """


@hookspec
def surgery_peft_mappings() -> list["PeftMapping"]:
    """How HF PEFT adapter types map to this plugin's methods, for the built-in `peft` adapter format.

    Returns: a list of objects satisfying `surgery.plugin.PeftMapping`, each with a `peft_type` (as PEFT writes it
    in `adapter_config.json`, e.g. "LOHA"), the `methods` whose attachments it writes, and `read`/`write` (see
    the protocol's docstring). Two mappings of one `peft_type`, or of one method, are a `PluginError`.

    Called: when `surgery.load` reads a PEFT directory (the mapping of its `peft_type` is used) and when
    `surgery.save(..., format="peft")` writes an attachment (the mapping of its methods is used);
    `surgery.plugin.peft_mappings()` returns them.
    """


@hookspec
def surgery_rule_dirs() -> list[Path]:
    """Directories holding rule files (`*.yaml`).

    Returns: a list of directory paths. Each file's `name:` is the rule-set name users pass to
    `surgery.plan`/`surgery.attach` and that `surgery rules` lists.

    Called: when a rule set is looked up by name, and by `surgery rules` / `surgery plugins`.

    Order: directories are read in pluggy's call order. A name declared twice is a `RuleFileError` naming both
    files, unless the first one's plugin asked to come first: `@hookimpl(tryfirst=True)` on its
    `surgery_rule_dirs` (or `trylast=True` on the other's). Then the first one is used: that is how a plugin
    replaces a built-in rule set of the same name.
    """
