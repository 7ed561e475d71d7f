"""Sites: the places in a model that a method can adapt, and the roles they play."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROLES: tuple[str, ...] = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "mlp.gate",
    "mlp.up",
    "mlp.down",
    "mlp.router",
    "embedding.input",
    "lm_head",
    "pooler",
    "head",
)
"""Every role a site can carry. Roles are read from dataflow, never from module names. `pooler`: a linear reading a
pooled representation (BERT's pooler.dense); `head`: a task head whose output is the model's (a classifier, a
score or projection head); neither is ever an MLP role. `mlp.router`: a linear whose output chooses the experts of a
mixture of experts."""

KINDS: tuple[str, ...] = ("linear", "conv1d", "quantized_linear", "embedding", "attention", "experts", "weight")
"""Every kind of site. `conv1d` is GPT-2's transposed linear (weight [in, out]). `experts`: stacked MoE expert
weights, one parameter [experts, out, in] (or [experts, in, out]) used by batched/grouped matmuls; the site's path
names the parameter (module path + "." + parameter name), and its roles are per expert (mlp.gate/up/down).
`weight`: a linear's weight [out, in] that a module reads in its own forward instead of calling a linear module
(nn.MultiheadAttention's `in_proj_weight`, q, k and v slices, and `out_proj.weight`); the path names the parameter.
Sites of the PARAMETER_KINDS are adapted in weight space (`Branch.adapt_weight`)."""

PARAMETER_KINDS: frozenset[str] = frozenset({"experts", "weight"})
"""Kinds whose site path names a parameter, not a module: the engine applies branches to the weight the module
reads (`Branch.adapt_weight`), and merges through the parameter itself."""

Slice = tuple[int, int]


@dataclass(frozen=True)
class AttentionInfo:
    """What the graph says about one attention computation (the facts prefix methods need)."""

    implementation: str  # "sdpa", "eager", or "mha" (torch.nn.MultiheadAttention's own)
    query: str | None  # paths of the projections feeding q, k, v and of the output projection
    key: str | None
    value: str | None
    output: str | None
    num_heads: int | None = None  # query heads
    num_kv_heads: int | None = None
    head_dim: int | None = None
    cross: bool = False  # keys/values come from another sequence (encoder-decoder cross-attention)
    causal: bool | None = None
    # in_features of the key projection (the width of what it reads): derived from the sites, not compared
    hidden_size: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Site:
    """One adaptable module of the live model.

    `path` is the module's name as in `model.named_modules()` (for the PARAMETER_KINDS "experts" and "weight", the
    parameter's name as in `model.named_parameters()`). `slices` is set for fused projections:
    role -> output-channel ranges [(start, stop), ...] that carry that role; an unfused site has none.
    `input_group` is set on linear-like sites that read one tensor together (a method may share work between
    them); it names the first of them, so sites with equal `input_group` read the same input.
    """

    path: str
    kind: str
    module_class: str  # qualified class name, e.g. "transformers.models.llama.modeling_llama.LlamaAttention"
    in_features: int | None = None
    out_features: int | None = None
    dtype: torch.dtype | None = None
    bias: bool = False  # the module adds a bias (linear-like kinds)
    roles: frozenset[str] = frozenset()
    slices: dict[str, tuple[Slice, ...]] = field(default_factory=dict)
    format: str | None = None  # quantized-linear format name, for kind == "quantized_linear"
    attention: AttentionInfo | None = None  # for kind == "attention"
    input_group: str | None = None  # path of the first site that reads the same input tensor (q/k/v, gate/up)
    num_experts: int | None = None  # for kind == "experts": how many experts the parameter stacks
    transposed: bool = False  # for kind == "experts": stored [experts, in, out] (else [experts, out, in])

    def channels(self, role: str) -> tuple[Slice, ...]:
        """Output-channel ranges of `role` on this site: its slices, or the whole output if unfused."""
        if role in self.slices:
            return self.slices[role]
        if self.out_features is None:
            raise ValueError(f"site {self.path!r} has no output features")
        return ((0, self.out_features),)

    def __hash__(self) -> int:
        return hash((self.path, self.kind))
