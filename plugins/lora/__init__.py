"""LoRA: the `lora` method, its formula and its fast paths.

- formula.py: the plain formula (y = base(x) + s · B(A(dropout(x))), ΔW = s · B @ A, the sliced and embedding
  forms, the scale): what every path computes and the tests' reference.
- dispatch.py: `choose`, the one place that decides which path computes a call, with every condition.
- The paths: fused.py (one autograd function for a linear and its branch), shared.py (the linears that read one
  input, together), merged_weight.py (through W + s · B @ A built per call), saved_input.py (an input kept as
  its factors), routes.py (per-sample routing, batched), kernels.py and triton_launch.py (Triton kernels on CUDA).
- branches.py: the branches the Host runs; plugin.py: the method and its `surgery_methods` hook (the module the
  `lora` entry point registers).
"""
from surgery_plugins.lora.plugin import Lora, LoraParams

__all__ = ["Lora", "LoraParams"]
