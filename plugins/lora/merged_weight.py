"""A LoRA linear's output through its merged weight, built per call: y = x @ (W + s·B @ A).T + b.

Nothing is merged into the model: the weight W + s·B @ A is a temporary, made from the live W, A and B on each
call and freed after it, so the adapter stays trainable, switchable and detachable. It replaces the branch's
passes over activations by one pass over the weight. Over T tokens, the separate LoRA term reads the layer input
once more for h = x @ A.T and reads and writes the output once more to add h @ B.T (about 2·T·(in + 2·out)
bytes, in skinny matmuls that run below bandwidth), and in backward reads and writes dx once more for dh @ A;
the merged weight costs a read of W and a write of its copy (4·in·out bytes) each time it is built. So it pays
from `T >= in` tokens on: long inputs and training batches, not token-by-token decoding. dispatch.py decides
where it is used (`MERGED_DEVICES`, `merged_pays`): on CUDA, where it was measured (`benchmarks/README.md`,
seventh round).

The result is what a merged layer computes: the update is rounded into the weight's precision, where the
separate term is rounded into the output's. For bf16 that is a little more error: a training forward through it
gave logits 0.2-6 % further from float64 than PEFT's bf16 adapters, the separate term 1-3 % nearer
(tests/test_bf16_accuracy.py). So a training forward never takes it: it serves the inference forms' outputs and
the fused linear's dx in backward.
"""
from __future__ import annotations

import torch

from surgery_plugins.lora import formula, kernels


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, one_pass: bool) -> torch.Tensor:
    """W + s · B @ A, a new tensor (W is read, not written); `one_pass` as for `merged_all`."""
    return merged_all((weight,), (a,), (b,), (s,), one_pass)[0]


def merged_all(weights: tuple, a_s: tuple, b_s: tuple, scales: tuple, one_pass: bool) -> list[torch.Tensor]:
    """[W_i + s_i · B_i @ A_i] for linears that read one input.

    With `one_pass` (the dispatch passes it where the kernels serve, in inference), by the kernel of kernels.py:
    one pass over each W_i and one launch for up to three, where torch.addmm copies each W_i into its output first
    and then reads and writes the copy. Its call costs the host about two addmm (65-79 µs for a q/k/v group
    against 30-35 µs an addmm on the lent H100s, launched directly: benchmarks/launch_host_cost.py), and in
    training the kernel lost to addmm in every step A/B so far (benchmarks/README.md, seventh to ninth rounds), so
    it is for inference, which the GPU bounds; training passes False."""
    if one_pass:
        return kernels.merged_weights(list(weights), list(a_s), list(b_s), list(scales))
    return [formula.delta_weight(a, b, s, weight=w) for w, a, b, s in zip(weights, a_s, b_s, scales)]
