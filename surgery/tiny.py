"""Tiny random-weight models of well-known architectures, for demos, tests and the CLI. Nothing is downloaded."""
from __future__ import annotations

from typing import Any, Callable

import torch

_COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2)


def _llama(**kw: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **_COMMON, **kw)


def _mistral(**kw: Any):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **_COMMON, **kw)


def _qwen2(**kw: Any):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **_COMMON, **kw)


def _phi3(**kw: Any):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM, Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                       **_COMMON, **kw)


def _gpt2(**kw: Any):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **_COMMON, **kw)


def _opt(**kw: Any):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM, OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=64, **_COMMON, **kw)


def _gpt_neox(**kw: Any):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM, GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, **_COMMON, **kw)


def _falcon(**kw: Any):
    from transformers import FalconConfig, FalconForCausalLM

    kw.setdefault("new_decoder_architecture", True)
    kw.setdefault("num_kv_heads", 2)
    return FalconForCausalLM, FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           **_COMMON, **kw)


def _bert(**kw: Any):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM, BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, **_COMMON, **kw)


def _t5(**kw: Any):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration, T5Config(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2,
                                                num_heads=4, decoder_start_token_id=0, **_COMMON, **kw)


ARCHITECTURES: dict[str, Callable[..., tuple[type, Any]]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt,
    "gpt_neox": _gpt_neox, "falcon": _falcon, "bert": _bert, "t5": _t5,
}


def config(arch: str, **overrides: Any):
    """The tiny config of `arch` (a key of ARCHITECTURES), with overrides applied."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](**overrides)[1]


def build(arch: str, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny `arch` model with random weights (seeded), in eval mode."""
    model_cls, cfg = ARCHITECTURES[arch](**overrides) if arch in ARCHITECTURES else (None, config(arch))
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype)
    return model.eval()
