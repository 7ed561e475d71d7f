"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel: He et al. 2021): a small
`down (d -> m) -> activation -> up (m -> d)` module with m << d, whose up projection starts at zero so an
attached model computes exactly what it did before.

Two methods:

- `adapter` (serial): at a site's output y, `y + scaling * up(dropout(act(down(norm(y)))))`. The rule set
  `adapter-houlsby` puts it after the attention output projection and after the MLP down projection,
  `adapter-pfeiffer` after the MLP down projection only.
- `parallel_adapter` (He et al.): beside a whole sublayer, `sublayer(x) + scaling * up(dropout(act(down(x))))`,
  x being the sublayer's input. The graph gives roles to projections, not to blocks, so one parallel adapter
  spans two sites of one attachment: an *input site*, whose input is the sublayer's input (`mlp.up` or
  `mlp.gate` for the MLP, `attention.query` for attention), and an *output site*, whose output is the
  sublayer's output (`mlp.down`, `attention.output`). The input site gets a `ParallelInput` branch without
  parameters that hands the tensor it sees, within the same forward, to the output site's `ParallelAdapter`
  branch, which holds the parameters and adds the adapter's output. The rule set `adapter-parallel` selects
  `mlp.up` and `mlp.down` (beside the MLP, He et al.'s best placement). Pairs are formed at attach from the
  module tree: each output site takes the input site of its sublayer kind with which it shares the deepest
  enclosing module (the MLP or attention block; the layer for BERT), one to one and mutually nearest, and the
  input site's input width must equal the output site's output width (the residual stream). Anything else is
  a `SiteError` and the attach is rolled back.

Under per-sample routing (`surgery.per_sample`), serial adapters of one kind (activation, layer norm, dtype)
run the whole batch at once: each sample gathers its own adapter's projections from weights stacked per
adapter, in batched matmuls (`SerialAdapter.prepare_routes`); the base runs once instead of once per adapter.

Neither method merges into the weights (the activation is not linear): `surgery.merge` refuses, and detach
restores the model bit for bit. Trainable state is in parameters only (`down.*`, `up.*`, `norm.*`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

import surgery
from surgery.plugin import Branch, Method, MethodParams, Site, SiteError, branch_dtype, input_of, module_device

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "tanh": nn.Tanh, "identity": nn.Identity,
}

INPUT_ROLES = {"mlp.up": "mlp", "mlp.gate": "mlp", "attention.query": "attention"}
"""Roles whose site input is a sublayer's input, by sublayer kind (for `parallel_adapter`)."""
OUTPUT_ROLES = {"mlp.down": "mlp", "attention.output": "attention"}
"""Roles whose site output is a sublayer's output, by sublayer kind (for `parallel_adapter`)."""


class AdapterParams(MethodParams):
    """`bottleneck`: the width m, or `reduction_factor`: m = d // reduction_factor (default 16; give one of
    the two). `activation` between the projections; `dropout` on the bottleneck; `scaling` of the adapter's
    output; `layer_norm`: a learned LayerNorm on the adapter's input; `init` of the down projection: `normal`
    (std 0.01, Houlsby) or `kaiming` (uniform, as nn.Linear and LoRA); the up projection is always zero.
    `dtype`: the parameters' dtype (default: the base weight's)."""

    bottleneck: int | None = Field(None, gt=0)
    reduction_factor: float | None = Field(None, gt=0)
    activation: Literal["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    scaling: float = 1.0
    layer_norm: bool = False
    init: Literal["normal", "kaiming"] = "normal"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @model_validator(mode="after")
    def _one_width(self) -> "AdapterParams":
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give either bottleneck or reduction_factor, not both")
        return self

    def width(self, features: int) -> int:
        """The bottleneck width m for a d = `features` wide stream (at most d: a wider one is no bottleneck)."""
        if self.bottleneck is not None:
            if self.bottleneck > features:
                raise SiteError(f"bottleneck={self.bottleneck} is wider than the {features} features it adapts")
            return self.bottleneck
        return max(1, int(features // (self.reduction_factor or 16.0)))

    def count(self, features: int) -> int:
        """Trainable parameters of one adapter on a `features`-wide stream (weights and biases, norm)."""
        m = self.width(features)
        return 2 * features * m + m + features + (2 * features if self.layer_norm else 0)


class Bottleneck(Branch):
    """`scaling * up(dropout(act(down(norm(x)))))`, d -> m -> d; `up` starts at zero."""

    def __init__(self, features: int, params: AdapterParams, dtype: torch.dtype, device: torch.device):
        super().__init__()
        m = params.width(features)
        self.scaling = params.scaling
        kw = dict(dtype=dtype, device=device)
        self.norm = nn.LayerNorm(features, **kw) if params.layer_norm else nn.Identity()
        self.down = nn.Linear(features, m, **kw)
        self.act = ACTIVATIONS[params.activation]()
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.up = nn.Linear(m, features, **kw)
        with torch.no_grad():
            if params.init == "normal":
                nn.init.normal_(self.down.weight, std=0.01)
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.down(self.norm(x.to(self.down.weight.dtype)))))
        return self.up(h) * self.scaling


class StackedAdapters(NamedTuple):
    """Serial adapters of several groups of samples, stacked per group (the last group: no adapter, all zero)."""

    down_weight: torch.Tensor  # [groups + 1, m, d], bottlenecks zero-padded to the widest m
    down_bias: torch.Tensor  # [groups + 1, m]
    up_weight: torch.Tensor  # [groups + 1, d, m]
    up_bias: torch.Tensor  # [groups + 1, d]
    scaling: torch.Tensor  # [groups + 1]
    norm: tuple[torch.Tensor, torch.Tensor, float] | None  # LayerNorm weight [groups + 1, d], bias, eps
    act: nn.Module


def _adapter_kind(branch: "SerialAdapter") -> tuple:
    """What adapters must share to run batched: activation, layer norm (and its eps), dtype."""
    norm = branch.norm.eps if isinstance(branch.norm, nn.LayerNorm) else None
    return type(branch.act), getattr(branch.act, "approximate", None), norm, branch.down.weight.dtype


class SerialAdapter(Bottleneck):
    """After the base module: `y + delta(y)` (the adapter's own residual)."""

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        return out + self.delta(out).to(out.dtype)

    @classmethod
    def prepare_routes(cls, branches: list["SerialAdapter"]) -> StackedAdapters:
        """Every group's adapter stacked (`StackedAdapters`). Declines with dropout in training, and where the
        adapters differ in activation, layer norm or dtype: then each group of samples runs by itself."""
        first = branches[0]
        if any(b.training and isinstance(b.dropout, nn.Dropout) for b in branches) or any(
                _adapter_kind(b) != _adapter_kind(first) for b in branches):
            raise NotImplementedError
        m = max(b.down.out_features for b in branches)
        w = first.down.weight

        def stack(tensors: list[torch.Tensor], none: torch.Tensor) -> torch.Tensor:
            return torch.stack(tensors + [none])

        down_w = stack([F.pad(b.down.weight, (0, 0, 0, m - b.down.out_features)) for b in branches],
                       w.new_zeros(m, w.shape[1]))
        down_b = stack([F.pad(b.down.bias, (0, m - b.down.out_features)) for b in branches], w.new_zeros(m))
        up_w = stack([F.pad(b.up.weight, (0, m - b.up.in_features)) for b in branches], w.new_zeros(w.shape[1], m))
        up_b = stack([b.up.bias for b in branches], w.new_zeros(w.shape[1]))
        scaling = torch.tensor([b.scaling for b in branches] + [0.0], dtype=w.dtype, device=w.device)
        norm = None
        if isinstance(first.norm, nn.LayerNorm):
            norm = (stack([b.norm.weight for b in branches], w.new_ones(w.shape[1])),
                    stack([b.norm.bias for b in branches], w.new_zeros(w.shape[1])), first.norm.eps)
        return StackedAdapters(down_w, down_b, up_w, up_b, scaling, norm, first.act)

    @classmethod
    def route_output(cls, state: StackedAdapters, group: torch.Tensor, args: tuple, kwargs: dict,
                     out: torch.Tensor) -> torch.Tensor:
        """`out + delta(out)` with each sample's own adapter: one batched matmul per projection, over the weights
        each sample gathers (batch × 2·m·d of them: a cost of memory that running per group avoids)."""
        y = out.to(state.down_weight.dtype)
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        if state.norm is not None:
            weight, bias, eps = state.norm
            y = F.layer_norm(y, y.shape[-1:], None, None, eps) * weight[group, None] + bias[group, None]
        h = state.act(torch.baddbmm(state.down_bias[group, None], y, state.down_weight[group].transpose(1, 2)))
        delta = torch.baddbmm(state.up_bias[group, None], h, state.up_weight[group].transpose(1, 2))
        delta = delta * state.scaling[group, None, None]
        return out + delta.reshape(out.shape).to(out.dtype)


class Handoff:
    """The sublayer's input, passed from a `ParallelInput` to its `ParallelAdapter` within one forward."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class ParallelAdapter(Bottleneck):
    """At the sublayer's output site: `y + delta(x)`, x the sublayer input handed over by its input site."""

    def __init__(self, path: str, sublayer: str, features: int, params: AdapterParams, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(features, params, dtype, device)
        self.path, self.sublayer, self.features = path, sublayer, features
        self.handoff = Handoff()
        self.source: str | None = None  # the input site's path, once paired

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        x, self.handoff.value = self.handoff.value, None
        if x is None:
            raise RuntimeError(f"parallel adapter at {self.path!r} ran without its sublayer's input: the input site "
                               f"{self.source!r} did not run before it in this forward")
        return out + self.delta(x).to(out.dtype)


class ParallelInput(Branch):
    """At the sublayer's input site: hands its input to the paired `ParallelAdapter`; changes nothing."""

    def __init__(self, path: str, sublayer: str, features: int):
        super().__init__()
        self.path, self.sublayer, self.features = path, sublayer, features
        self.handoff: Handoff | None = None  # the paired adapter's, set at attach

    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.handoff is None:
            raise RuntimeError(f"parallel adapter input at {self.path!r} is not paired with an output site")
        self.handoff.value = input_of(args, kwargs)
        return args, kwargs


def _whole_output(site: Site, roles: frozenset[str], method: str) -> int:
    sliced = sorted(r for r in roles if r in site.slices)
    if sliced:
        raise SiteError(f"{method} acts on the whole output of a site; {site.path!r} is a fused projection and the "
                        f"rule selects only its {', '.join(sliced)} channels")
    if site.out_features is None:
        raise SiteError(f"{method} needs the output features of {site.path!r}, which the analysis did not give")
    return site.out_features


class Adapter(Method):
    name = "adapter"
    params = AdapterParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        return SerialAdapter(_whole_output(site, roles, self.name), params, branch_dtype(params.dtype, site.dtype), module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        return params.count(_whole_output(site, roles, self.name))


def _part(site: Site, roles: frozenset[str]) -> tuple[str, str]:
    """("input" or "output", sublayer kind) of a parallel adapter's site, from its selected roles."""
    roles = roles or site.roles
    inputs = {INPUT_ROLES[r] for r in roles if r in INPUT_ROLES}
    outputs = {OUTPUT_ROLES[r] for r in roles if r in OUTPUT_ROLES}
    if len(inputs) + len(outputs) != 1:
        raise SiteError(f"parallel_adapter at {site.path!r} (roles {', '.join(sorted(roles)) or 'none'}) must be either "
                        f"a sublayer input site ({', '.join(INPUT_ROLES)}) or a sublayer output site "
                        f"({', '.join(OUTPUT_ROLES)})")
    if inputs:
        if site.in_features is None:
            raise SiteError(f"parallel_adapter needs the input features of {site.path!r}")
        return "input", inputs.pop()
    _whole_output(site, roles, "parallel_adapter")
    return "output", outputs.pop()


class ParallelAdapterMethod(Method):
    name = "parallel_adapter"
    params = AdapterParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        part, sublayer = _part(site, roles)
        if part == "input":
            return ParallelInput(site.path, sublayer, site.in_features)
        return ParallelAdapter(site.path, sublayer, site.out_features, params, branch_dtype(params.dtype, site.dtype), module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        part, _ = _part(site, roles)
        return 0 if part == "input" else params.count(site.out_features)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None]:
        inputs = {p: b for p, b in branches.items() if isinstance(b, ParallelInput)}
        outputs = {p: b for p, b in branches.items() if isinstance(b, ParallelAdapter)}
        pairs = pair_sites(inputs, outputs)
        for out_path, in_path in pairs.items():
            inputs[in_path].handoff = outputs[out_path].handoff
            outputs[out_path].source = in_path

        def undo() -> None:
            for out_path, in_path in pairs.items():
                inputs[in_path].handoff = None
                outputs[out_path].source = None

        return undo


def _shared_depth(a: str, b: str) -> int:
    """How many leading path components `a` and `b` share (the depth of their deepest common module)."""
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def _nearest(path: str, candidates: list[str]) -> list[str]:
    if not candidates:
        return []
    best = max(_shared_depth(path, c) for c in candidates)
    return [c for c in candidates if _shared_depth(path, c) == best]


def pair_sites(inputs: dict[str, ParallelInput], outputs: dict[str, ParallelAdapter]) -> dict[str, str]:
    """Output site path -> input site path: each output site with the input site of the same sublayer kind that
    shares its deepest enclosing module, mutually and uniquely. Raises SiteError naming the sites otherwise."""
    pairs: dict[str, str] = {}
    for out_path, out in outputs.items():
        same = [p for p, b in inputs.items() if b.sublayer == out.sublayer]
        near = _nearest(out_path, same)
        if len(near) != 1:
            found = f"several equally near ({', '.join(near)})" if near else "none"
            raise SiteError(f"parallel_adapter at {out_path!r} needs one {out.sublayer} input site in the same block "
                            f"({' or '.join(r for r, k in INPUT_ROLES.items() if k == out.sublayer)}) selected by the "
                            f"same rule set; found {found}")
        in_path = near[0]
        back = _nearest(in_path, [p for p, b in outputs.items() if b.sublayer == out.sublayer])
        if back != [out_path]:
            raise SiteError(f"parallel_adapter input site {in_path!r} is nearest to {', '.join(back)}, not only to "
                            f"{out_path!r}: cannot tell which sublayer it feeds")
        if inputs[in_path].features != out.features:
            raise SiteError(f"parallel_adapter: the input of {in_path!r} has {inputs[in_path].features} features but "
                            f"the output of {out_path!r} has {out.features}; a parallel adapter spans a residual "
                            "sublayer, whose input and output widths agree")
        pairs[out_path] = in_path
    unpaired = sorted(set(inputs) - set(pairs.values()))
    if unpaired:
        raise SiteError(f"parallel_adapter input sites without an output site: {', '.join(unpaired)}")
    return pairs


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Adapter(), ParallelAdapterMethod()]
