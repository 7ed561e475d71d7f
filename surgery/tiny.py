"""Tiny random-weight models of well-known architectures, for demos, tests and the CLI. Nothing is downloaded."""
from __future__ import annotations

from typing import Any

import torch
import transformers

_COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (config class, model class, config values)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, word_embed_proj_dim=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                             num_attention_heads=4, max_position_embeddings=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         new_decoder_architecture=True, num_kv_heads=2)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=64)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2,
                                                          num_heads=4, decoder_start_token_id=0)),
}


def _entry(arch: str) -> tuple[str, str, dict[str, Any]]:
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def config(arch: str, **overrides: Any):
    """The tiny config of `arch` (a key of ARCHITECTURES), with `overrides` replacing its values."""
    config_class, _, values = _entry(arch)
    return getattr(transformers, config_class)(**{**_COMMON, **values, **overrides})


def supports_sdpa(arch: str) -> bool:
    """Whether the installed transformers has an sdpa attention for `arch` (T5's came in transformers 5.15)."""
    return bool(getattr(transformers, _entry(arch)[1])._supports_sdpa)


def build(arch: str, attn: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny `arch` model with random weights (seeded), in eval mode; `attn` defaults to sdpa where it exists."""
    cfg = config(arch, **overrides)
    cfg._attn_implementation = attn or ("sdpa" if supports_sdpa(arch) else "eager")
    torch.manual_seed(seed)
    return getattr(transformers, _entry(arch)[1])(cfg).to(dtype).eval()
