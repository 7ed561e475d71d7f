"""What a method plugin implements: a `Method` that builds `Branch` modules, one per site."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from surgery.core.sites import Site
from surgery.errors import NotMergeableError, SiteError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                   "float64": torch.float64}
"""The dtype names a method's `dtype` param may take."""


def branch_dtype(choice: str | None, default: torch.dtype | None) -> torch.dtype:
    """The dtype of a branch's parameters: the one a rule names (a key of DTYPES), else `default`, else float32."""
    if choice is not None:
        return DTYPES[choice]
    return default or torch.float32


def check_rank(method: str, site: Site, r: int, limit: int, why: str = "min(in, out)") -> None:
    """Refuse (`SiteError`, naming the method, site and limit) a rank `r` above `limit` at `site`: called from a
    method's `count`, so a size param is checked when the plan is made, before anything is allocated."""
    if r > limit:
        raise SiteError(f"{method} at {site.path!r}: r={r} is more than {why} = {limit} of the site; a larger rank "
                        "adds parameters but nothing the site can express")


def first_float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def module_device(module: nn.Module) -> torch.device:
    """Where the module's tensors live (the CPU for a module without any): where a branch for it belongs."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


class MethodParams(BaseModel):
    """Base for a method's params model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class Branch(nn.Module):
    """A method's trainable part at one site, run by the engine's `Host` around the frozen base module.

    Override either or both:
    - `adapt_call(args, kwargs) -> (args, kwargs)`: change the base module's inputs (runs before it);
    - `adapt_output(args, kwargs, out) -> out`: change its output (`args`/`kwargs` are the inputs the base saw).
    A branch with `replaces_base = True` is called (`branch(*args, **kwargs)`) instead of the base module.
    At a site whose path names a parameter (kinds `experts`, `weight`) the branch changes the weight instead:
    `adapt_weight(weight) -> weight`, see there.

    Two optional fast paths, each offered by the Host in one situation and each free to decline, so that a branch
    is correct with the two methods above alone:
    - `fused_call(base, args, kwargs)`: the site's whole output, when this branch is the only one running there
      and samples are not routed (LoRA: base and update in one autograd function, or the linears that read one
      input computed together).
    - `prepare_routes(branches)` / `route_output(state, group, args, kwargs, out)`: under per-sample routing
      (`surgery.per_sample`), every sample's own branch applied to the whole batch's base output at once, instead
      of the base running once per group of samples (LoRA, IA3's output scaling, serial bottleneck adapters);
      and, with them, `route_call(state, group, base, args, kwargs)`: the base's output and the branches' at once.
    """

    replaces_base: bool = False
    kept_when_merged: bool = False
    """A branch that stands in for its base module whole (`replaces_base`, e.g. a trained module copy) and has no
    weight edit: merging its attachment leaves it running, so the merged model computes the same function, and
    `surgery.bake` puts `baked_module()` in the base module's place. Its method need not be `mergeable`."""
    reads_base_weight: bool = False
    """A branch whose output reads the base module's weight itself (DoRA's row norms): a merge of another attachment
    into that weight would change what this branch computes, so the engine refuses it while this branch runs."""
    running: bool = False
    """Set by the engine: True while this branch runs at its site (its attachment active and unmerged, adapters
    not disabled). Model-level hooks of a method (`attach_model`) read it to act only while their branch runs."""

    def fused_call(self, base: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Optional: compute the site's output, the base module's and this branch's together, in one go.

        Called by the Host on every call while this is the only branch running at its site and samples are not
        routed (so nothing else changes the base's inputs or output); `base` is the module the Host would call.
        Return NotImplemented to decline: the Host then runs `adapt_call`, the base and `adapt_output` as usual.
        Used by LoRA (see `surgery_plugins.lora.dispatch`)."""
        return NotImplemented

    @classmethod
    def prepare_routes(cls, branches: list["Branch"]) -> Any:
        """Optional batched per-sample routing: gather what `route_output` needs from `branches` (one per group
        of samples, all of this class; group len(branches) runs no branch). Called once per routing in inference
        (the Host keeps the result until the routing changes or a parameter or buffer of `branches` is written in
        place: version counters), on every call in training. Raise NotImplementedError to decline (e.g. dropout
        in training, or a change `route_output` cannot make on the base output): the Host then runs each group of
        samples through the base and its own branch. Used by LoRA (stacked pairs), IA3 (stacked output vectors)
        and serial bottleneck adapters (stacked weights)."""
        raise NotImplementedError

    @classmethod
    def route_output(cls, state: Any, group: torch.Tensor, args: tuple, kwargs: dict, out: Any) -> Any:
        """Optional, with `prepare_routes`: apply each sample's branch (group[i] indexes the branches given to
        `prepare_routes`; len(branches) means none) to `out`, the base module's output for the whole batch on
        `args`/`kwargs`, at once. The result must equal running each sample alone through its branch.
        `surgery.plugin.group_numbers(group)` gives group's numbers on the host, without waiting for the device."""
        raise NotImplementedError

    @classmethod
    def route_call(cls, state: Any, group: torch.Tensor, base: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Optional, with `prepare_routes`: the routed call's whole output, the base module's included (`base`
        is the module the Host would call), where computing both together pays (LoRA in training: one backward
        for the input's gradient). Offered before the base runs, on every routed call; return NotImplemented to
        decline: the Host then runs the base and `route_output`. The same contract as `route_output` otherwise."""
        return NotImplemented

    def baked_module(self) -> nn.Module:
        """With `kept_when_merged`: the module that takes the base module's place for good on `surgery.bake`."""
        raise NotImplementedError(f"{type(self).__name__} sets kept_when_merged but has no baked_module()")

    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def adapt_output(self, args: tuple, kwargs: dict, out: Any) -> Any:
        return out

    def adapt_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """At a site whose path names a parameter (kinds `experts`, `weight`): the weight to use, from `weight` as
        [experts, out, in] or [out, in] (a view, whatever the stored layout; do not write to it). Called each time the model reads the parameter while
        this branch runs (once per call of the module holding it); the result keeps the shape and dtype and
        carries the branch's gradients. `adapt_call`/`adapt_output` are not called at such sites."""
        raise NotImplementedError(f"{type(self).__name__} cannot adapt stacked expert weights")


class SlicedBranch(Branch):
    """Branches acting on the selected roles' channels of one fused projection (e.g. only q and v of GPT-2's
    c_attn), one per role in `parts`, applied to the output in turn."""

    def __init__(self, parts: dict[str, Branch]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def adapt_output(self, args: tuple, kwargs: dict, out: Any) -> Any:
        for part in self.parts.values():
            out = part.adapt_output(args, kwargs, out)
        return out

    def adapt_weight(self, weight: torch.Tensor) -> torch.Tensor:
        for part in self.parts.values():
            weight = part.adapt_weight(weight)
        return weight


@dataclass(frozen=True)
class WeightEdit:
    """A merge as two pure functions of the dense weight [out, in] ([experts, out, in] at an `experts` site):
    `apply` folds a branch in, `revert` takes it out. Both return new tensors in the weight's dtype; the engine writes them back and makes unmerge exact.

    `apply_bias` (optional) folds the branch into the module's bias [out] too, where it has one; the engine
    keeps the original bias (it is small) and puts it back on unmerge. A module without a bias keeps none, so
    it suits edits that map a zero bias to zero (e.g. scaling output channels).

    `form` (optional) says what the branch does at its site, so the engine can tell whether folding it into the
    weights keeps the site's function while other attachments' branches run there too (see `EDIT_FORMS`):
    `"add"` (the branch adds a term linear in the input the base module receives: W -> W + D, e.g. LoRA),
    `"scale_output"` (it multiplies the output channels: W -> diag(s) W, bias too), `"scale_input"` (it
    multiplies the input before the base module: W -> W diag(s)), `"transform_input"` (it applies a matrix T to the
    input before the base module: W -> W T, e.g. OFT's rotation), or `"unknown"` (the default: such a merge is
    refused where another unmerged branch acts at the same site).
    """

    apply: Callable[[torch.Tensor], torch.Tensor]
    revert: Callable[[torch.Tensor], torch.Tensor]
    apply_bias: Callable[[torch.Tensor], torch.Tensor] | None = None
    form: str = "unknown"


EDIT_FORMS = ("add", "scale_output", "scale_input", "transform_input", "unknown")
"""The values `WeightEdit.form` takes."""


def input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input of a single-input module call (`module(x)` or `module(input=x)`)."""
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise TypeError(f"expected one input, got {len(args)} positional and keywords {sorted(kwargs)}")


class Method:
    """An adaptation method. Subclass it, set the class attributes, implement `build` and `count`
    (and `merge_edit` if `mergeable`), and return an instance from the `surgery_methods` hook."""

    name: ClassVar[str]
    params: ClassVar[type[MethodParams]]
    kinds: ClassVar[frozenset[str]]
    mergeable: ClassVar[bool] = False

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        raise NotImplementedError

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        raise NotImplementedError

    def narrow(self, sites: list[Site], params: Any) -> list[Site]:
        """Optional: of the sites one rule selected (in model order, all of kinds this method takes), those it
        adapts. Default: all. E.g. Llama-Adapter keeps the top `adapter_layers` attention sites. Return a subset in
        the same order; raise `SurgeryError` to refuse (the planner names the rule)."""
        return sites

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        raise NotMergeableError(f"method {self.name!r} cannot be merged into the base weights")

    def combine(self, site: Site, branches: list[Branch], weights: list[float], how: str) -> tuple[dict, dict]:
        """Optional (`surgery.combine`): one new branch equivalent to the weighted combination of `branches`
        (one per source attachment, same site). Return (the new branch's params as a dict, its state_dict)."""
        raise NotMergeableError(f"method {self.name!r} cannot combine attachments")

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None] | None:
        """Optional model-level change after this method's branches are installed (e.g. a forward pre-hook that
        extends the attention mask for virtual tokens). Return a function that undoes it; the engine calls it
        on detach and when an attach fails later on. Default: nothing to do."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name} kinds={sorted(self.kinds)} mergeable={self.mergeable}>"


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model, not counting any branch's."""
    branch_params = {id(p) for m in model.modules() if isinstance(m, Branch) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in branch_params)
