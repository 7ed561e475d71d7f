"""The plugin author's manual: every hook that surgery calls.

A plugin is a module (or object) with functions marked `@surgery.hookimpl`, named as below. Register it with an
entry point in your package's `pyproject.toml`::

    [project.entry-points.surgery]
    my_plugin = "my_package.my_plugin"

surgery loads every module of the `surgery` entry-point group on first use (`surgery.registry.manager()`);
`surgery.register_plugin(obj)` adds one at run time. The built-in methods, formats and rule files are plugins of
exactly this kind (see `plugins/`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from surgery.core.formats import AdapterFormat, WeightFormat
    from surgery.core.method import Method

PROJECT = "surgery"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def surgery_methods() -> list["Method"]:
    """Return the adaptation methods this plugin provides (instances of `surgery.Method` subclasses).

    A method declares `name` (the `method:` of a rule), `params` (a pydantic model validating the rule's
    `params:`), `kinds` (the site kinds it accepts) and `mergeable`. It implements:

    - `build(site, module, params, roles) -> Branch`: a new `surgery.Branch` module holding the method's
      trainable parameters for one site. It must not modify `module` or the model: the engine installs the
      branch, and removes it again on detach or when an attach fails part-way. `roles` are the roles the rule
      selected on this site (on a fused projection, act only on `site.channels(role)`); empty means the whole
      module.
    - `count(site, params, roles) -> int`: the trainable parameters `build` would create (for `surgery.plan`).
    - `merge_edit(site, module, branch) -> WeightEdit` (mergeable methods only): pure functions on the site's
      dense weight [out, in] (and optionally its bias) that fold the branch in and take it out again. The engine
      applies them through the site's weight format and keeps what it needs to make unmerge bit-exact. Raise
      `NotMergeableError` to refuse (e.g. a zero scale that would make unmerge lossy); nothing has changed then.
    - optional `attach_model(model, branches) -> undo`: a model-level change once the branches are installed
      (e.g. a forward pre-hook extending the attention mask, or linking the branches at sites with one
      `site.input_group` to share work, as LoRA does); the engine calls `undo()` on detach or rollback.
    - optional `combine(site, branches, weights, how) -> (params, state)`: for `surgery.combine`.

    The `Branch` runs inside the engine's `Host` at its site: `adapt_call(args, kwargs)` may change the base
    module's inputs, `adapt_output(args, kwargs, out)` its output; `replaces_base = True` calls the branch instead
    of the base. Optional fast paths: `fused_call(base, args, kwargs)` (base and branch in one go when it is the
    only branch running, which the engine keeps in `branch.runs_alone`; return NotImplemented to decline) and
    the class methods `prepare_routes` / `route_output` (all samples of a per-sample-routed batch at once). All state worth saving must live in the
    branch's parameters and persistent buffers: `surgery.save` writes its `state_dict`.

    Two plugins offering the same method name is an error naming both.
    """


@hookspec
def surgery_weight_formats() -> list["WeightFormat"]:
    """Return weight formats: how to recognise a module kind and read or write its weight as dense [out, in].

    This is the hook for quantized linear layers: a format with `kind = "quantized_linear"` whose
    `matches(module)` recognises the layer by its signature (integer weight, scale, bit width: duck typing, not
    class names) and whose `dense()`/`store()` dequantize and requantize. Sites it claims get kind
    `quantized_linear` and `site.format = format.name`. Formats are tried by descending `priority`.
    """


@hookspec
def surgery_adapter_formats() -> list["AdapterFormat"]:
    """Return adapter file formats other than surgery's own, e.g. HF PEFT's. Each has a `name` (what
    `surgery.save(..., format=name)` takes) and three functions:

    - `detect(directory) -> bool`: whether `directory` holds an adapter of this format;
    - `load(model, directory, name) -> Attachment`: attach it (through `surgery.attach` and
      `surgery.adapter_files.fill_branches`, so the model is left unchanged if it does not fit);
    - `save(model, attachment, directory) -> Path`: write it (through `surgery.atomic.write_directory`).
    """


@hookspec
def surgery_rule_dirs() -> list[Path]:
    """Return directories holding rule files (`*.yaml`). Each file's `name:` is the rule-set name users pass
    to `surgery.plan`/`surgery.attach`. Two files declaring the same name is an error naming both."""
