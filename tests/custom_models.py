"""Hand-written (non-transformers) models for the graph analysis tests.

`Misnamed`: module names say nothing about roles (a fused `proj_in` producing k, v, q interleaved per head, an
attention output called `a`, an MLP of `a`/`b`/`c` whose down projection is an int4 quantized linear), the head
reached through an alias. `TinyGLM`: a ChatGLM-like model with multi-query attention (fused `query_key_value` =
q for all heads, then k and v for 2 KV heads), rotary, an eager core attention in its own module, and a SwiGLU
MLP whose `dense_h_to_4h` is chunked into gate and up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Int4Linear(nn.Module):
    """A linear whose weight is int4 packed in an int8 buffer, dequantized inside forward (shifts, stack, scale)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", torch.randint(-128, 127, (out_features, in_features // 2), dtype=torch.int8))
        self.scale = nn.Parameter(torch.full((out_features,), 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.bitwise_right_shift(torch.bitwise_left_shift(self.packed, 4), 4)
        high = torch.bitwise_right_shift(self.packed, 4)
        weight = torch.stack([low, high], dim=-1).reshape(self.packed.shape[0], -1)
        return F.linear(x, weight.to(x.dtype) * self.scale[:, None])


class Mixer(nn.Module):
    """Attention with a fused input projection laid out per head as [k_h, v_h, q_h]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.proj_in = nn.Linear(dim, 3 * dim)
        self.a = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        k, v, q = self.proj_in(x).view(b, s, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.a(out.transpose(1, 2).reshape(b, s, -1))


class Feed(nn.Module):
    """Gated MLP with names that hide the roles: b(gelu(a(x)) * c(x)); b is int4 quantized."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c = nn.Linear(dim, hidden, bias=False)
        self.a = nn.Linear(dim, hidden, bias=False)
        self.b = Int4Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(x)) * self.c(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mix = Mixer(dim, heads)
        self.ff = Feed(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.n1(x))
        return x + self.ff(self.n2(x))


class Misnamed(nn.Module):
    """A small decoder whose module names are misleading; `tokens` carries the token ids."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, hidden: int = 48, depth: int = 3):
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        self.where = nn.Embedding(64, dim)
        self.stack = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.readout = self.head  # an alias: forward calls it under this second name

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.table(tokens) + self.where(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.stack:
            x = block(x)
        return self.readout(self.norm(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(torch.arange(seq, device=device).float(), self.inv_freq)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ChatGLM style: rotate interleaved pairs on the first half of each head, pass the rest."""
    rot, rest = x.chunk(2, dim=-1)
    pairs = rot.unflatten(-1, (-1, 2))
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


class CoreAttention(nn.Module):
    """Eager causal attention: matmul, scale, masked_fill, softmax, dropout, matmul."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [b, heads, s, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = scores.shape[-1]
        mask = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
        probs = self.dropout(F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1))
        out = torch.matmul(probs, v)
        return out.permute(0, 2, 1, 3).flatten(2)


class GLMSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.query_key_value = nn.Linear(dim, dim + 2 * kv_heads * self.head_dim)
        self.core_attention = CoreAttention()
        self.dense = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d, kv = self.head_dim, self.kv_heads
        q, k, v = self.query_key_value(x).split([self.heads * d, kv * d, kv * d], dim=-1)
        q = apply_rotary(q.view(b, s, self.heads, d), cos, sin)
        k = apply_rotary(k.view(b, s, kv, d), cos, sin)
        group = self.heads // kv
        k = k.unsqueeze(-2).expand(b, s, kv, group, d).reshape(b, s, self.heads, d)
        v = v.view(b, s, kv, 1, d).expand(b, s, kv, group, d).reshape(b, s, self.heads, d)
        return self.dense(self.core_attention(q, k, v))


class GLMMLP(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, 2 * ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(self.dense_h_to_4h(x), 2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attention = GLMSelfAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = GLMMLP(dim, ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(dim, heads, kv_heads, ffn) for _ in range(layers))
        self.final_layernorm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_layernorm(x)


class TinyGLM(nn.Module):
    """ChatGLM-like: embedding, rotary, multi-query blocks, output layer."""

    def __init__(self, vocab: int = 96, dim: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 80,
                 layers: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.rotary_pos_emb = Rotary(dim // heads // 2)
        self.encoder = GLMEncoder(dim, heads, kv_heads, ffn, layers)
        self.output_layer = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_pos_emb(input_ids.shape[1], input_ids.device)
        return self.output_layer(self.encoder(self.word_embeddings(input_ids), cos, sin))
