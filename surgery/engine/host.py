"""The Host: the module the engine swaps in at an adapted site. It runs the frozen base module and the active
branches around it; the base module object is kept untouched and put back on detach."""
from __future__ import annotations

import functools
import weakref
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from surgery.core.method import Branch
from surgery.core.versions import versions
from surgery.errors import SurgeryError


class Host(nn.Module):
    """Wraps `base` (the original module) and the branches of every attachment at this site, by name.

    Branches run in attachment order: each active, unmerged branch may change the call's inputs
    (`adapt_call`), then the base runs (or the last running branch that `replaces_base`), then each may change
    the output (`adapt_output`). Where exactly one branch runs, it is first offered the whole call
    (`Branch.fused_call`) and may decline. Attribute reads the Host does not know fall through to the base
    (`host.weight` is `base.weight`). `running` (the running branches' names) and `routing` are public state,
    set by the ledger.

    Per-sample routing (`surgery.per_sample`): `routing` names one attachment (or None) per sample; each sample
    then runs only its own branch. Where all the branches in use are of one class that implements
    `prepare_routes`/`route_output`, the base runs once for the whole batch and the class applies each sample's
    branch to it (LoRA, IA3, serial adapters), or computes both at once (`route_call`, where it accepts);
    otherwise, or where `prepare_routes` declines, the base and each group's branch run once per group of samples.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()
        self.running = ()  # active and unmerged branch names, in order; set by the ledger
        self.routing: tuple[str | None, ...] | None = None  # per-sample names; set by the ledger
        self._routes: dict[Any, Any] = {}  # what this site derived for the routing in force (see set_routing)

    @property
    def running(self) -> tuple[str, ...]:
        return self._running

    @running.setter
    def running(self, names: tuple[str, ...]) -> None:
        self._running = tuple(names)
        self._running_branches = tuple(self.branches[n] for n in self._running)  # looked up once, not per call
        self.__dict__["_last_routes"] = None  # the branches may have changed: nothing kept for a routing holds

    def add(self, name: str, branch: Branch) -> None:
        self.branches[name] = branch
        self.running = self.running  # a replaced branch is the one that runs
        self._routes = {}

    def remove(self, name: str) -> Branch:
        self.running = tuple(n for n in self.running if n != name)
        self._routes = {}
        return self.branches.pop(name)

    def set_routing(self, routing: tuple[str | None, ...] | None, usable: Collection[str]) -> None:
        """Route sample i to branch routing[i] (if it is in `usable`, else to the base alone).

        What the site derived for a routing (its groups, their branches) is kept for the next block routed
        alike (a training step of surgery.jobs enters one per step) until the branches change (`running` is
        set); a branch's kept inference state, and the tensors whose versions guard it, are dropped when the
        block ends."""
        # plain attributes, set in __dict__ directly: nn.Module's __setattr__ costs more, on every per_sample block
        state = self.__dict__
        routing = None if routing is None else tuple(n if n in usable else None for n in routing)
        state["routing"] = routing
        last = state["_last_routes"]
        if routing is None:
            if last is not None:
                last[1].pop("state", None)  # may hold copies of the branches' tensors
                last[1].pop("tensors", None)  # found again per block: a parameter object may be replaced between
            state["_routes"] = {}
        elif last is not None and last[0] == routing:
            state["_routes"] = last[1]
        else:
            state["_routes"] = {}
            state["_last_routes"] = (routing, state["_routes"])

    def _run(self, branches: tuple[Branch, ...] | list[Branch], args: tuple, kwargs: dict) -> Any:
        base = self._modules["base"]  # not through nn.Module.__getattr__ (and this class's): this runs on every call
        if len(branches) == 1:
            out = branches[0].fused_call(base, args, kwargs)
            if out is not NotImplemented:
                return out
        call = base
        for branch in branches:
            args, kwargs = branch.adapt_call(args, kwargs)
            if branch.replaces_base:
                call = branch
        out = call(*args, **kwargs)
        for branch in branches:
            out = branch.adapt_output(args, kwargs, out)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None:
            return self._routed(args, kwargs)
        return self._run(self._running_branches, args, kwargs)

    # ---- per-sample routing ---------------------------------------------------------------------------------
    def routing_state(self) -> dict[Any, Any]:
        """What this site derived for the routing in force (its group index, its branches' batched state), kept
        until the routing changes. A CUDA graph of a routed step reads those tensors by address: it keeps this."""
        return self._routes

    def _groups(self, batch: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """The branch names in use and, per sample of a batch of `batch`, its group number (len(names) = none)."""
        key = (batch, device)
        if key not in self._routes:
            names = list(dict.fromkeys(n for n in self.routing if n is not None))
            per_sample = [names.index(n) if n is not None else len(names) for n in self.routing]
            if batch % len(per_sample):
                raise SurgeryError(f"per-sample adapters: {len(per_sample)} names given for a batch of {batch}")
            self._routes[key] = (names, _group_index(tuple(per_sample), batch // len(per_sample), device))
        return self._routes[key]

    def _route_kind(self, names: list[str]) -> tuple[list[Branch], type[Branch] | None]:
        """The branches of `names` and, where they are all of one class that batches routes, that class (kept for
        the routing: this runs on every call)."""
        found = self._routes.get("kind")
        if found is None or found[0] is not names:
            branches = [self.branches[n] for n in names]
            kind = type(branches[0]) if branches else None
            batched = kind is not None and all(type(b) is kind for b in branches) and _batches_routes(kind)
            found = self._routes["kind"] = (names, branches, kind if batched else None)
        return found[1], found[2]

    def _route_tensors(self, branches: list[Branch]) -> tuple[torch.Tensor, ...]:
        """The parameters and buffers of the routed branches (kept for the routing), whose version counters tell
        whether a kept inference state still holds."""
        found = self._routes.get("tensors")
        if found is None:
            found = self._routes["tensors"] = tuple(t for b in branches for t in (*b.parameters(), *b.buffers()))
        return found

    @torch.compiler.disable  # routing keeps Python state (caches per routing, outputs kept for the next site)
    def _routed(self, args: tuple, kwargs: dict) -> Any:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None:
            raise SurgeryError("per-sample adapters: the call has no tensor input to route")
        names, index = self._groups(x.shape[0], x.device)
        branches, kind = self._route_kind(names)
        if kind is not None:
            state = now = None
            if not torch.is_grad_enabled():  # kept while no branch tensor is written in place (version counters)
                kept, now = self._routes.get("state"), versions(self._route_tensors(branches))
                if kept is not None and kept[1] == now:
                    state = kept[0]
            if state is None:
                try:
                    state = kind.prepare_routes(branches)
                except NotImplementedError:  # e.g. dropout in training: run the groups one by one
                    return self._run_groups(branches, index, x.shape[0], args, kwargs)
                if now is not None:
                    self._routes["state"] = (state, now)
            base = self._modules["base"]
            out = kind.route_call(state, index, base, args, kwargs)
            if out is NotImplemented:
                out = kind.route_output(state, index, args, kwargs, base(*args, **kwargs))
            return out
        return self._run_groups(branches, index, x.shape[0], args, kwargs)

    def _run_groups(self, branches: list[Branch], index: torch.Tensor, batch: int, args: tuple, kwargs: dict) -> Any:
        """Generic routing: run each group of samples through the base and its own branch, then reassemble."""
        take = lambda value, rows: value.index_select(0, rows) if isinstance(value, torch.Tensor) and value.dim() \
            and value.shape[0] == batch else value  # noqa: E731
        out = None
        for group in range(len(branches) + 1):
            rows = (index == group).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = self._run(branches[group:group + 1], tuple(take(a, rows) for a in args),
                             {k: take(v, rows) for k, v in kwargs.items()})
            if not isinstance(part, torch.Tensor):
                raise SurgeryError(f"per-sample adapters: {type(self.base).__name__} returns "
                                   f"{type(part).__name__}, only tensor outputs can be routed generically")
            if out is None:
                out = part.new_zeros((batch, *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "branches"):
                raise
            return getattr(self.base, name)

    def extra_repr(self) -> str:
        return f"running={list(self.running)}"


_numbers: dict[int, tuple[int, ...]] = {}  # id(group index) -> its numbers on the host, while the tensor lives


@functools.lru_cache(maxsize=256)
def _group_index(per_sample: tuple[int, ...], repeat: int, device: torch.device) -> torch.Tensor:
    """Each sample's group number, every entry of `per_sample` repeated `repeat` times (generate's beams), on
    `device`. One tensor per routing, shared by every host routed alike and kept across calls and steps (never
    written), so that what branches derive from it is made once (LoRA's masks); copied without waiting for the
    device's queue. Its numbers stay readable on the host (`group_numbers`)."""
    numbers = tuple(n for n in per_sample for _ in range(repeat))
    index = torch.tensor(numbers)
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    else:
        index = index.to(device)
    _numbers[id(index)] = numbers
    weakref.finalize(index, _numbers.pop, id(index), None)
    return index


def group_numbers(group: torch.Tensor) -> tuple[int, ...] | None:
    """The group number of each sample of a routed call, as the `group` tensor given to `Branch.route_output` and
    `route_call` holds them, read on the host without waiting for the device: for work that depends on where each
    group's samples lie (e.g. products over one group's rows only). None for a tensor the engine did not make."""
    return _numbers.get(id(group))


def _batches_routes(kind: type[Branch]) -> bool:
    """Whether a branch class implements batched per-sample routing (overrides `prepare_routes`)."""
    return kind.prepare_routes.__func__ is not Branch.prepare_routes.__func__


class ParameterHost(nn.Module):
    """What the engine puts at a site whose path names a parameter (kinds `experts`, `weight`): a parametrization
    of the parameter
    (`torch.nn.utils.parametrize`), so that every read of `module.<name>` gives the stored weight with the running
    branches' `adapt_weight` applied, in attachment order. The stored parameter object is kept untouched (at
    `module.parametrizations.<name>.original`) and put back, in its place among the module's parameters, on
    detach. Within one call of the module the adapted weight is computed once (an eager MoE reads it per expert).
    Branches see the weight as [out, in] ([experts, out, in]), whatever the stored layout (`transposed`).

    Same public state as `Host` (`branches`, `running`, `routing`), set by the ledger. Per-sample routing cannot
    act on a weight shared by the whole batch: a routed call whose names include one of these branches is refused.
    """

    def __init__(self, module: nn.Module, name: str, transposed: bool):
        super().__init__()
        self.branches = nn.ModuleDict()
        self.running = ()
        self.routing: tuple[str | None, ...] | None = None
        self.transposed = transposed
        self.name = name
        self._cached: torch.Tensor | None = None
        self._calls = 0
        object.__setattr__(self, "module", module)  # the module holding the parameter: not a submodule of this

    @property
    def running(self) -> tuple[str, ...]:
        return self._running

    @running.setter
    def running(self, names: tuple[str, ...]) -> None:
        self._running = tuple(names)
        self._running_branches = tuple(self.branches[n] for n in self._running)
        self._cached = None

    def add(self, name: str, branch: Branch) -> None:
        self.branches[name] = branch
        self.running = self.running

    def remove(self, name: str) -> Branch:
        self.running = tuple(n for n in self.running if n != name)
        self._routes = {}
        return self.branches.pop(name)

    def set_routing(self, routing: tuple[str | None, ...] | None, usable: Collection[str]) -> None:
        self.routing = None if routing is None else tuple(n if n in usable else None for n in routing)
        self._cached = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            if any(n is not None for n in self.routing):
                raise SurgeryError(f"per-sample adapters: the branches at stacked expert weights "
                                   f"{type(self.module).__name__}.{self.name} change one weight for the whole batch; "
                                   "they cannot be routed per sample")
            return weight
        if not self._running_branches:
            return weight
        if self._cached is not None:
            return self._cached
        dense = weight.transpose(-1, -2) if self.transposed else weight
        for branch in self._running_branches:
            dense = branch.adapt_weight(dense)
        out = dense.transpose(-1, -2) if self.transposed else dense
        if self._calls:
            self._cached = out
        return out

    def enter_call(self, *_: Any) -> None:
        """Forward pre-hook of the module holding the parameter: keep the adapted weight for this call."""
        self._calls += 1

    def leave_call(self, *_: Any) -> None:
        self._calls = max(self._calls - 1, 0)
        if not self._calls:
            self._cached = None

    def extra_repr(self) -> str:
        return f"{self.name}, running={list(self.running)}"


def install_parameter_host(module: nn.Module, name: str, transposed: bool) -> ParameterHost:
    """Parametrize `module.<name>` with a new ParameterHost (undone by `remove_parameter_host`)."""
    from torch.nn.utils import parametrize

    host = ParameterHost(module, name, transposed)
    host.order = list(module._parameters)  # to put the parameter back in its place
    parametrize.register_parametrization(module, name, host, unsafe=True)
    host.hooks = (module.register_forward_pre_hook(host.enter_call),
                  module.register_forward_hook(host.leave_call, always_call=True))
    return host


def reinstall_parameter_host(host: ParameterHost) -> None:
    """Parametrize the parameter again with `host` itself, after `remove_parameter_host` (a pass rolled back): the
    same parametrization objects, class and hooks as before, so the model is exactly as it was."""
    from torch.nn.utils import parametrize

    module = host.module
    cls, table, plist, keys = host.stored
    module._parameters.pop(host.name)  # the original parameter, held again by `plist.original`
    if "parametrizations" not in module._modules:
        module._modules["parametrizations"] = table
    table[host.name] = plist
    for key in keys:  # the parametrizations in their old order
        if key in table._modules:
            table._modules[key] = table._modules.pop(key)
    module.__class__ = cls
    parametrize._inject_property(module, host.name)
    for hook_table, key, hook in host.stored_hooks:  # the same hooks under their old ids
        hook_table[key] = hook


def remove_parameter_host(host: ParameterHost) -> None:
    """Take the parametrization off: the module holds its original parameter object again, in its place."""
    from torch.nn.utils import parametrize

    module = host.module
    host.stored = (module.__class__, module.parametrizations, module.parametrizations[host.name],
                   list(module.parametrizations.keys()))
    host.stored_hooks = [(table, hook.id, table[hook.id]) for hook in host.hooks
                         for table in (ref() for ref in (hook.hooks_dict_ref, *hook.extra_dict_ref))
                         if table is not None and hook.id in table]
    for hook in host.hooks:
        hook.remove()
    parametrize.remove_parametrizations(module, host.name, leave_parametrized=False)
    params = module._parameters
    reordered = {k: params[k] for k in host.order if k in params}
    reordered.update({k: v for k, v in params.items() if k not in reordered})
    params.clear()
    params.update(reordered)


def stored_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter `name` as stored, whether or not a ParameterHost parametrizes it now."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return module._parameters[name]
