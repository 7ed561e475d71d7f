"""The ChatGLM weight-only quantized linear layer as usable code: the INT4/INT8 format's arithmetic, the
`QuantizedLinear` module, and `quantize(model, bits)` that converts a model's linears as ChatGLM does.

The format, per output row (symmetric, no zero point):

    scale = max|w| / (2**(bits-1) - 1)          weight_scale: [out], float (fp16 in ChatGLM's checkpoints)
    int   = round(w / scale)                    weight: int8 [out, in] (8 bits) or [out, in/2] (4 bits)
    w     = int * scale[:, None]

At 4 bits two values share a byte: the even column in the high nibble, the odd column in the low nibble, each a
two's-complement int4.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

BIT_WIDTHS = (4, 8)


def _check_bits(bits: int) -> int:
    if int(bits) not in BIT_WIDTHS:
        raise ValueError(f"weight_bit_width must be 4 or 8, got {bits!r}")
    return int(bits)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7], shape [out, in] with `in` even, into int8 bytes [out, in/2]."""
    if values.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of input features, got {values.shape[-1]}")
    nibbles = values.to(torch.int16) & 0x0F
    pairs = nibbles.reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
    return (pairs[..., 0] * 16 + pairs[..., 1]).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 values [out, 2 * cols] stored in packed bytes [out, cols] (inverse of `pack_int4`)."""
    high = torch.bitwise_right_shift(packed, 4)  # arithmetic shift: sign-extends the high nibble
    low = torch.bitwise_and(packed, 0x0F)
    low = torch.where(low > 7, low - 16, low)
    return torch.stack((high, low), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_weight(weight: torch.Tensor, bits: int,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [out, in] per row: (int8 weight, packed at 4 bits; scale [out] in `scale_dtype`,
    default the weight's dtype).

    The integers are rounded against the stored (already `scale_dtype`-rounded) scale, so dequantizing gives the
    nearest grid value of the scale actually kept. A zero row gets scale 0 and zero integers.
    """
    bits = _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / qmax).to(scale_dtype or weight.dtype)
    divisor = scale.float()
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    ints = torch.round(w / divisor[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    return (pack_int4(ints) if bits == 4 else ints), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] in `dtype`: `int * scale[:, None]`, computed in the scale's dtype or wider."""
    ints = unpack_int4(qweight) if int(bits) == 4 else qweight
    wide = torch.promote_types(scale.dtype, dtype)
    return (ints.to(wide) * scale.to(wide)[:, None]).to(dtype)


class DequantLinear(torch.autograd.Function):
    """`x @ dequantize(qweight, scale).T` with a gradient for `x` only: the quantized tensors are frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        return F.linear(x, dequantize_weight(qweight, scale, bits, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qweight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_weight(qweight, scale, ctx.bits, grad_out.dtype)
        return grad_x, None, None, None


class QuantizedLinear(nn.Module):
    """A linear layer with an INT4/INT8 weight and a per-row scale (the ChatGLM layout), computing in the input's
    dtype. `weight`, `weight_scale` and `bias` are frozen parameters (integer tensors cannot require grad), so
    `model.half()` / `.float()` convert the scale and bias with the rest of the model, as in ChatGLM."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        bits = _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"a 4-bit QuantizedLinear needs an even in_features, got {in_features}")
        self.in_features, self.out_features, self.weight_bit_width = in_features, out_features, bits
        self.weight = nn.Parameter(torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, scale_dtype: torch.dtype | None = None) -> "QuantizedLinear":
        """Quantize an nn.Linear; the scale is kept in `scale_dtype` (default: the weight's dtype, as ChatGLM does,
        so it is the dtype the model computes in), the bias in its own dtype."""
        dtype = linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                    scale_dtype=scale_dtype or dtype, bias_dtype=dtype, device=linear.weight.device)
        qweight, scale = quantize_weight(linear.weight, bits, scale_dtype)
        with torch.no_grad():
            layer.weight.copy_(qweight)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in]."""
        return dequantize_weight(self.weight, self.weight_scale, self.weight_bit_width, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = DequantLinear.apply(x, self.weight, self.weight_scale, self.weight_bit_width)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bit_width}, "
                f"bias={self.bias is not None}")


def quantize(model: nn.Module, bits: int, exclude: Iterable[str] = (),
             scale_dtype: torch.dtype | None = None) -> list[str]:
    """Replace, in place, every float nn.Linear of `model` whose path matches none of the `exclude` globs by a
    `QuantizedLinear` of `bits` (4 or 8), scales in `scale_dtype` (default: each weight's dtype). A linear shared
    by several parents stays shared. Returns the paths converted. Raises ValueError (nothing converted) if a
    4-bit layer has an odd number of input features."""
    bits = _check_bits(bits)
    patterns = list(exclude)
    chosen: dict[int, nn.Linear] = {}
    for path, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.weight.is_floating_point()
                and not any(fnmatchcase(path, p) for p in patterns)):
            if bits == 4 and module.in_features % 2:
                raise ValueError(f"cannot quantize {path!r} to 4 bits: odd in_features {module.in_features}")
            chosen.setdefault(id(module), module)
    converted = {key: QuantizedLinear.from_linear(linear, bits, scale_dtype) for key, linear in chosen.items()}
    paths = []
    for parent_path, parent in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in converted:
                setattr(parent, name, converted[id(child)])
                paths.append(f"{parent_path}.{name}" if parent_path else name)
    return paths
