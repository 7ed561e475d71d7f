"""An architecture zoo: every transformers architecture that builds from a small config, and a gradient oracle.

`tiny_config(model_type)` shrinks a config class's defaults (widths, depths, heads, experts, image and audio sizes,
vocabularies where the special token ids allow it), nested configs included; sizes the config derives from others
are recomputed from the small ones, multimodal rope sections fitted to the small head, and `OVERRIDES` holds what
no generic rule gives. Models whose inputs surgery cannot make from the config get a user's inputs from `INPUTS`. `build(model_type)` picks the
model class (causal LM, seq2seq LM, masked LM, image-text-to-text, else the base model) and builds it with random
weights. `oracle(model, args, kwargs)` runs the model once for real and says, for every attention computation,
which output channels of which linear-like module reach its query, key and value operands: each linear-like
module's output is cut from the graph before it (a new leaf), the attention's q, k, v are caught where they are
used (`scaled_dot_product_attention`, or the matmul -> ... -> softmax -> matmul chain of eager attention), and
one backward per operand reads the non-zero gradient channels. nn.MultiheadAttention reads its projections' weights
itself: its `F.linear` calls on them are cut the same way (credited to `<mha>.in_proj_weight`, from the row the
slice starts at), and its functional forward is let run op by op under the recording mode. `compare(model, facts, seen)` puts surgery's
roles and slices beside it.

Run the whole zoo with `SURGERY_ZOO=1 python -m pytest tests/test_zoo.py`, or `python tests/zoo.py > zoo.jsonl`
(a JSON line per architecture and variant) then `python tests/zoo.py --summary zoo.jsonl` (counts by status, the
reasons, analysis times); the default suite runs a representative subset.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

QKV = ("attention.query", "attention.key", "attention.value")

_WIDTH = ("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim", "dim", "model_dim", "word_embed_proj_dim",
          "embedding_size", "d_embed", "n_embed", "projection_dim", "text_embed_dim", "vision_embed_dim",
          "encoder_hidden_size", "decoder_hidden_size", "qformer_hidden_size", "cross_attention_hidden_size",
          "hidden_size_per_head_times_heads", "output_hidden_size", "proj_dim", "projection_size",
          "classifier_proj_size", "conv_dim_last", "mit_hidden_size", "fpn_hidden_size", "hidden_size_global")
_DEPTH = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers",
          "n_layers", "num_encoder_layers", "decoder_num_layers", "num_text_layers", "num_vision_layers",
          "text_num_layers", "num_blocks")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
          "n_heads", "decoder_num_attention_heads", "num_attention_heads_text")
_FFN = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
        "decoder_intermediate_size", "hidden_act_dim", "mlp_dim", "ff_dim", "mit_intermediate_size")
_SMALL = {
    "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16, "d_head": 16, "attention_head_dim": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k": 2, "num_experts_per_token": 2, "moe_k": 2, "num_expert_group": 1,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "first_k_dense_replace": 1, "max_position_embeddings": 128, "max_source_positions": 64,
    "max_target_positions": 64, "n_positions": 128, "n_ctx": 128, "num_mel_bins": 16, "image_size": 64,
    "rotary_dim": 8, "num_frames": 4, "frames_per_clip": 4, "crop_size": 64, "n_window": 4,
    "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1,
    "patch_size": 8, "num_query_tokens": 4, "image_seq_length": 16, "num_channels": 3, "n_routed_experts_top": 2,
    "sliding_window": 64, "attention_window": 4, "num_buckets": 32, "relative_attention_num_buckets": 8,
    "position_buckets": 16, "max_relative_positions": 16, "conv_dim": 32, "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4, "vocab_size_per_layer_input": None,
}
_KEEP_LISTS = ("layer_types", "mlp_only_layers", "block_types", "attn_layer_indices", "full_attn_idxs")


def _ids(config: Any) -> list[int]:
    out = []
    for name, value in vars(config).items():
        if name.endswith(("token_id", "token_index", "_id")) and isinstance(value, int) and not isinstance(value, bool):
            out.append(value)
        elif name.endswith("token_ids") and isinstance(value, (list, tuple)):
            out += [v for v in value if isinstance(v, int)]
    return out


def _shrunk(config: Any) -> dict[str, Any]:
    """Overrides of `config`'s own values that make it tiny (nested configs as dicts, shrunk too)."""
    from transformers import PreTrainedConfig

    values: dict[str, Any] = {}
    own = {**config.to_dict(), **vars(config)}  # to_dict has fields kept elsewhere (per_layer_config)
    for name, value in own.items():
        if isinstance(value, PreTrainedConfig):
            small = _shrunk(value)
            values[name] = {**value.to_dict(), **small, **_derived(type(value), value, small)}
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if name in _WIDTH:
            values[name] = 64
        elif name in _DEPTH:
            values[name] = 2 if value >= 2 else value
        elif name in _HEADS:
            values[name] = 4
        elif name in _FFN:
            values[name] = 96
        elif name in _SMALL and _SMALL[name] is not None:
            values[name] = min(value, _SMALL[name]) if name in ("first_k_dense_replace",) else _SMALL[name]
    if "vocab_size" in own and isinstance(own["vocab_size"], int):
        biggest = max(_ids(config), default=0)
        values["vocab_size"] = max(256, biggest + 1) if biggest < 4096 else own["vocab_size"]
    depth_name = next((d for d in _DEPTH if isinstance(own.get(d), int)), None)
    depth = own.get(depth_name) if depth_name else None
    layer_types = own.get("layer_types")
    if isinstance(layer_types, (list, tuple)) and layer_types:  # one layer of each type, in order
        firsts = {t: i for i, t in reversed(list(enumerate(layer_types)))}
        reps = sorted(firsts.values())
        reps = reps if len(reps) >= 2 else [reps[0], reps[0] + 1 if len(layer_types) > 1 else reps[0]]
    elif depth:
        reps = list(range(min(depth, 2)))
    else:
        reps = []
    if depth and reps:
        for name in _DEPTH:
            if isinstance(own.get(name), int) and own.get(name) == depth:
                values[name] = len(reps)
        for name, value in own.items():  # per-layer lists and {layer index: ...} tables follow the kept layers
            if isinstance(value, (list, tuple)) and len(value) == depth and name not in ("id2label", "label2id"):
                values[name] = [value[j] for j in reps]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                width = len(str(next(iter(value))))
                kept = {f"{i:0{width}d}": _small_dict(value[k]) for i, j in enumerate(reps)
                        for k in value if int(k) == j}
                values[name] = kept
    if "num_key_value_heads" in values and values.get("num_key_value_heads") and own.get("num_key_value_heads") \
            and own.get("num_key_value_heads") == own.get("num_attention_heads"):
        values["num_key_value_heads"] = 4  # an MHA model stays MHA
    if "head_dim" in own and own.get("head_dim") is None:
        values.pop("head_dim", None)
    if "num_query_tokens" in own and own.get("image_token_index", 0) is None:
        text = own.get("text_config")
        vocab = getattr(text, "vocab_size", None) if text is not None else None
        values["image_token_index"] = (values.get("text_config", {}).get("vocab_size") or vocab or 256) - 1
    if "qk_rope_head_dim" in own:  # multi-head latent attention: rope on part of each head
        if isinstance(own.get("head_dim"), int) and own.get("qk_rope_head_dim"):  # the rope part as in the full size
            values["head_dim"] = values["qk_rope_head_dim"] * own["head_dim"] // own["qk_rope_head_dim"]
        elif "head_dim" in own:
            values["head_dim"] = values["qk_rope_head_dim"]
        if "qk_head_dim" in own:
            values["qk_head_dim"] = values["qk_rope_head_dim"] + values["qk_nope_head_dim"]
    if "mlp_only_layers" in own:
        values["mlp_only_layers"] = []
    stages = own.get("embed_dim_per_stage")
    if isinstance(stages, (list, tuple)) and stages and "hidden_size" in values:  # the first stage's width is
        values["hidden_size"] = stages[0]  # the patch embedding's (sam2's hiera), a list the rules leave full
    experts = next((values[n] for n in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
                    if isinstance(values.get(n), int)), None)
    for name in ("num_experts_per_tok", "n_group", "topk_group"):  # unset where the defaults leave routing open
        if experts and name in own and own[name] is None:
            values[name] = 2 if name == "num_experts_per_tok" else 1
    return values


def _small_dict(value: Any) -> Any:
    """A nested plain dict with its sizes shrunk like a config's (gemma4's per-layer head_dim)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if isinstance(v, int) and not isinstance(v, bool) and k in _SMALL and _SMALL[k] is not None:
            out[k] = _SMALL[k]
        elif isinstance(v, int) and not isinstance(v, bool) and k in _WIDTH:
            out[k] = 64
        else:
            out[k] = _small_dict(v)
    return out


OVERRIDES: dict[str, dict[str, Any]] = {
    "mpnet": {"relative_attention_num_buckets": 32},  # the modeling code buckets positions into 32, fixed
    "udop": {"relative_attention_num_buckets": 32},
    "layoutlmv3": {"hidden_size": 96, "coordinate_size": 16, "shape_size": 16},  # 4 coordinates + 2 sizes = width
    "sam": {"vision_config": {"output_channels": 64, "num_pos_feats": 32}},  # the image embedding's width is the
    "sam_hq": {"vision_config": {"output_channels": 64, "num_pos_feats": 32}},  # mask decoder's; positions half each
    # the thinkers' rope index reads config.vision_start_token_id on a padded batch, which their configs lack
    "qwen2_5_omni_thinker": {"vision_start_token_id": 254},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 254},
    "seggpt": {"image_size": [64, 32]},  # (height, width): a list the generic rule leaves
    "timesfm": {"context_length": 64},  # a whole number of 32-step patches, not 512 or 16384 steps
    "timesfm2_5": {"context_length": 64},
    # efficientnet's channels scale by width_coefficient; the last (320 or 1280 at scale 1) must match the
    # projection (align) or hidden_dim (efficientnet), which the generic rule makes 64
    "align": {"vision_config": {"width_coefficient": 0.2}},
    "efficientnet": {"width_coefficient": 0.05},
    "levit": {"patch_size": 16},  # the patch embedding is 4 stride-2 convolutions: 16, whatever patch_size says
    "lilt": {"hidden_size": 96},  # 6 layout embeddings of hidden_size // 6, and a layout stream 4 times narrower
    "mobilevitv2": {"patch_size": 2},  # unfolded from the 4x4 map the tiny image leaves
    # the mask decoder reads the image embedding (4x and 2x the prompt grid below it) at these sizes: a 64-pixel
    # image, 16 pixels a prompt-grid cell
    "sam2": {"vision_config": {"backbone_config": {"image_size": [64, 64]},
                               "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]]},
             "prompt_encoder_config": {"patch_size": 16}},
    "tvp": {"max_img_size": 128, "visual_prompt_size": 8},  # frames of 128 pixels, padded by a prompt 8 wide
    "qwen3_asr_encoder": {"n_window": 50},  # its output lengths count 13 frames per 100-frame chunk, fixed
    "sam2_vision_model": {"backbone_config": {"image_size": [64, 64]},
                          "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]]},
    "sam2_hiera_det_model": {"image_size": [64, 64]},  # not 1024 pixels (8 GB on the CPU)
    "fastspeech2_conformer_with_hifigan": {"vocoder_config": {"model_in_dim": 16}},  # the mel bins it is given
    "instructblipvideo": {"video_token_id": 255},  # unset by default; the processor adds it (the last token here)
    "clap": {"audio_config": {"patch_embeds_hidden_size": 32}},  # doubled per stage: 2 stages end at hidden_size
    # the speech encoder reads the decoder's tokens (its vocabulary); the rotary part of a head is 32 at least
    "clvp": {"speech_config": {"vocab_size": 8194, "hidden_size": 128}, "text_config": {"hidden_size": 128}},
    "xcodec2": {"quantization_dim": 128},  # the semantic and acoustic features side by side: twice hidden_size
    "neucodec": {"quantization_dim": 128},
    # its rope pairs the height and width sections, so they must be equal (the default sections are 22, 22, 20)
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default",
                                                            "mrope_section": [3, 3, 2]}}},
    # the image token in the shrunk text vocabulary (its own ids say nothing of the image's); a sliding window
    # set, as the modeling code always builds the sliding mask
    "step3p7": {"image_token_id": 255, "text_config": {"sliding_window": 64}},
    # the head concatenates all 6 bridge stages' maps (as the released config names them): the default names the last
    "uvdoc": {"backbone_config": {"out_features": [f"stage{i}" for i in range(1, 7)],
                                  "out_indices": list(range(1, 7))}},
    "sam3_tracker": {"vision_config": {"backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]]}},
}
"""model_type -> config values no generic rule gives (with the reason)."""


def tiny_config(model_type: str):
    """The config class's defaults, shrunk; raises on a config that will not take the small values."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    small = _merged(_shrunk(default), OVERRIDES.get(model_type, {}))
    config = cls(**{**default.to_dict(), **small})
    derived = _derived(cls, default, small)
    if derived:
        config = cls(**{**default.to_dict(), **small, **derived})
    for sub in _configs(config):
        _fit_rope_sections(sub)
    return config


def _merged(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`values` with `overrides` put in, nested dicts (sub-configs) merged key by key."""
    out = dict(values)
    for name, value in overrides.items():
        out[name] = _merged(out[name], value) if isinstance(value, dict) and isinstance(out.get(name), dict) \
            else value
    return out


def _derived(cls: type, default: Any, small: dict[str, Any]) -> dict[str, Any]:
    """Sizes the config class computes from others when not given (zamba2's attention_hidden_size from
    hidden_size): passing the defaults back would keep the full-size value beside the small ones."""
    try:
        fresh, plain = vars(cls(**small)), vars(cls())
    except Exception:
        return {}
    before = vars(default)  # a nested config's values as its parent sets them: only the class defaults follow
    return {name: value for name, value in fresh.items() if name not in small and name in before
            and isinstance(value, int) and not isinstance(value, bool) and value != plain.get(name)
            and before[name] == plain.get(name)}


def _configs(config: Any) -> list:
    """`config` and every config nested in it."""
    from transformers import PreTrainedConfig

    out, todo = [], [config]
    while todo:
        one = todo.pop()
        if any(one is seen for seen in out):
            continue
        out.append(one)
        todo += [v for v in vars(one).values() if isinstance(v, PreTrainedConfig)]
    return out


def _modeling_mentions(config: Any, word: str) -> bool:
    """Whether the modeling file beside `config`'s configuration file mentions `word`."""
    path = getattr(sys.modules.get(type(config).__module__), "__file__", None) or ""
    modeling = os.path.join(os.path.dirname(path), os.path.basename(path).replace("configuration_", "modeling_"))
    if not path or not os.path.exists(modeling):
        return False
    with open(modeling) as f:
        return word in f.read()


def _fit_rope_sections(config: Any) -> None:
    """Multimodal rope (qwen2-vl, glm4v) splits each head's rotary half into (time, height, width) sections that
    must sum to it; the modeling code's default sections fit the full-size head only, so give ones that fit."""
    if not _modeling_mentions(config, "mrope_section"):
        return
    rope = getattr(config, "rope_parameters", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not isinstance(rope, dict) or not head_dim:
        return
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    half = int(head_dim * factor) // 2
    weights = rope.get("mrope_section") or [2, 3, 3]
    sections = [max(1, half * w // sum(weights)) for w in weights]
    sections[-1] = half - sum(sections[:-1])
    rope["mrope_section"] = sections


_CLASS_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                   "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                   "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                   "MODEL_MAPPING_NAMES")


def model_types() -> list[str]:
    """Model types with a model class in one of the auto mappings used here."""
    from transformers.models.auto import modeling_auto

    types: set[str] = set()
    for mapping in _CLASS_MAPPINGS:
        types |= set(getattr(modeling_auto, mapping))
    from transformers import CONFIG_MAPPING

    return sorted(t for t in types if t in CONFIG_MAPPING)


def model_class(model_type: str):
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in _CLASS_MAPPINGS:
        name = getattr(modeling_auto, mapping).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise KeyError(f"no model class for {model_type}")


def build(model_type: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random-weight model of `model_type`, in eval mode, with `attn` where the model supports it."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    cls = model_class(model_type)
    try:
        model = cls._from_config(config, attn_implementation=attn)
    except (ValueError, ImportError):
        model = cls._from_config(config, attn_implementation="eager")
    return model.float().eval()


def set_attention(model: nn.Module, attn: str) -> bool:
    """Switch a built model to `attn` (all sub-models); False where it refuses."""
    try:
        model.set_attn_implementation(attn)
    except Exception:
        return False
    return True


def padded(kwargs: dict, args: tuple, model: nn.Module) -> tuple[tuple, dict]:
    """The same inputs with a padded attention_mask (row 0 left-padded by 3 tokens), where the forward takes one."""
    params = inspect.signature(model.forward).parameters
    if "attention_mask" not in params:
        return args, kwargs
    ids = args[0] if args else None
    if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        main = kwargs.get("input_ids")
        ids = main if isinstance(main, torch.Tensor) else None
    if ids is None:
        return args, kwargs
    mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
    mask[0, :3] = 0
    extra = {}
    decoder = kwargs.get("decoder_input_ids")
    if isinstance(decoder, torch.Tensor) and "decoder_attention_mask" in params:  # as a user's batch has it
        extra["decoder_attention_mask"] = torch.ones(decoder.shape, dtype=torch.long, device=decoder.device)
    return args, {**kwargs, "attention_mask": mask, **extra}


# ---------------------------------------------------------------------------------------------- the oracle


def _linear_like(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    if next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)
            and "linear" in type(module).__name__.lower())


_MATMULS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm, torch.einsum,
            torch.baddbmm, torch.Tensor.baddbmm}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.nn.functional.log_softmax}


_PASS = frozenset({
    "mul", "div", "truediv", "add", "sub", "rsub", "radd", "rmul", "where", "masked_fill", "tanh", "to", "float",
    "type_as", "clamp", "clamp_min", "max", "maximum", "cat", "concat", "dropout", "contiguous", "view", "reshape",
    "transpose", "expand", "getitem", "softcap", "iadd", "imul", "itruediv", "neg", "exp", "amax", "clone", "half",
    "bfloat16", "squeeze", "unsqueeze", "permute", "flatten", "unflatten", "narrow", "float32",
})
"""Ops an attention score passes between the q·k product and the softmax, and the probabilities on to ·v."""


class _Catch(TorchFunctionMode):
    """Records attention computations: SDPA calls, and eager score matmul -> ... -> softmax -> ... -> matmul."""

    def __init__(self, weights: dict[int, tuple[str, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.weights = weights or {}  # storage pointer -> (path, parameter) of weights a module reads itself
        self.running: set[str] = set()  # linear-like modules inside their own forward (cut there by their hook)
        self.cuts: list[tuple[str, torch.Tensor, int]] = []  # (parameter path, cut output, first channel)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id(t) -> (q, k, t)
        self.probs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.keep: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear and self.weights and isinstance(out, torch.Tensor):
            return self._cut(args, kwargs, out)
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
            self.calls.append((q, k, v))
            return out
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        if func in _MATMULS:
            operands = [t for t in tensors if t.dim() >= 2]
            weight = next((t for t in operands if self._weight(t) is not None), None)
            if weight is not None and isinstance(out, torch.Tensor):  # a projection by a parameter (xlnet's einsum)
                return self._cut_by(weight, out)
            if func in (torch.baddbmm, torch.Tensor.baddbmm):
                operands = operands[1:]
            prob = next((self.probs[id(t)] for t in operands if id(t) in self.probs), None)
            if prob is not None and len(operands) == 2:
                other = operands[1] if id(operands[0]) in self.probs else operands[0]
                self.calls.append((prob[0], prob[1], other))
                return out
            if len(operands) == 2 and isinstance(out, torch.Tensor):
                self._track(self.scores, out, (operands[0], operands[1]))
            return out
        if func in _SOFTMAX:
            src = next((self.scores[id(t)] for t in tensors if id(t) in self.scores), None)
            if src is not None and isinstance(out, torch.Tensor):
                self._track(self.probs, out, src[:2])
            return out
        if getattr(func, "__name__", "").strip("_").rstrip("_") not in _PASS:
            return out
        for table in (self.scores, self.probs):
            src = next((table[id(t)] for t in tensors if id(t) in table), None)
            if src is not None:
                for o in _flat([out]):
                    if isinstance(o, torch.Tensor):
                        self._track(table, o, src[:2])
        return out

    def _cut(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        """F.linear by (a row slice of) a weight a module reads itself (nn.MultiheadAttention's in_proj_weight,
        out_proj.weight): its output is cut like a linear module's, with the slice's first channel."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return self._cut_by(weight, out)

    def _weight(self, tensor: Any) -> tuple[str, torch.Tensor] | None:
        return self.weights.get(tensor.untyped_storage().data_ptr()) if isinstance(tensor, torch.Tensor) else None

    def _cut_by(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Cut `out`, a product by (a view of) a registered parameter; credited from the output channel the view
        starts at: a row of a 2-D weight (nn.MultiheadAttention's q/k/v thirds of in_proj_weight), a row within one
        expert of stacked experts [experts, out, in] (JetMoE's F.linear on `weight[i]`), else 0."""
        found = self._weight(weight)
        if found is None or not out.is_floating_point() or found[0] in self.running:
            return out
        path, param = found
        offset = weight.storage_offset() - param.storage_offset()
        if param.dim() == 2:
            first = offset // param.stride(0)
        elif param.dim() == 3 and weight.dim() == 2 and weight.shape == param.shape[1:]:
            first = offset % param.stride(0) // param.stride(1)
        else:
            first = 0
        leaf = out.detach().requires_grad_(True)
        self.cuts.append((path, leaf, first))
        return leaf.clone()

    def _track(self, table: dict, tensor: torch.Tensor, qk: tuple) -> None:
        table[id(tensor)] = (qk[0], qk[1], tensor)
        self.keep.append(tensor)


def _flat(items: Any) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out += _flat(item)
        else:
            out.append(item)
    return out


@dataclass
class Seen:
    """What the oracle saw: per attention computation, role -> {linear path: channels}."""

    calls: list[dict[str, dict[str, frozenset[int]]]] = field(default_factory=list)

    def union(self) -> dict[tuple[str, str], frozenset[int]]:
        out: dict[tuple[str, str], set[int]] = {}
        for call in self.calls:
            for role, by_path in call.items():
                for path, channels in by_path.items():
                    out.setdefault((path, role), set()).update(channels)
        return {k: frozenset(v) for k, v in out.items()}


def oracle(model: nn.Module, args: tuple, kwargs: dict) -> Seen:
    """Which output channels of which linear-like module reach each attention computation's q, k and v."""
    paths: list[tuple[str, torch.Tensor]] = []
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def cut(module, _inputs, output):
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (cut(module, _inputs, output[0]), *output[1:])  # (output, scale) of quantized linears (ibert)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        leaf = output.detach().requires_grad_(True)
        paths.append((names[id(module)], leaf))
        return leaf.clone()  # the model may write into its projections' outputs in place (falcon)

    def entered(module, _inputs):
        catch.running.add(names[id(module)])

    def left(module, _inputs, _output):
        catch.running.discard(names[id(module)])

    for name, module in model.named_modules():
        if _linear_like(module):
            handles.append(module.register_forward_pre_hook(entered))
            handles.append(module.register_forward_hook(cut))
            handles.append(module.register_forward_hook(left))
    weights = {}  # nn.MultiheadAttention reads its projections' weights itself: cut its F.linear calls on them
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            for pname, param in (("in_proj_weight", module.in_proj_weight), ("out_proj.weight", module.out_proj.weight)):
                weights[param.untyped_storage().data_ptr()] = (f"{name}.{pname}", param)
        elif _linear_like(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
            # a linear's weight read by another module (WavLM passes q_proj.weight to F.multi_head_attention_forward)
            weights.setdefault(module.weight.untyped_storage().data_ptr(), (f"{name}.weight", module.weight))
        elif not _linear_like(module):  # 3-D parameters read by a product: stacked experts, einsum projections
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    weights.setdefault(param.untyped_storage().data_ptr(), (f"{name}.{pname}", param))
    catch = _Catch(weights)
    functional = torch.nn.functional
    dispatches = functional.has_torch_function  # F.multi_head_attention_forward would reach the mode as one call

    def opened(ops: Any) -> bool:  # ... so let it run its own ops (linear, sdpa, bmm, softmax) under the mode
        return False if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in weights
                            for t in ops) else dispatches(ops)

    functional.has_torch_function = opened
    try:
        with torch.enable_grad(), catch:
            model(*args, **kwargs)
    finally:
        functional.has_torch_function = dispatches
        for h in handles:
            h.remove()
    seen = Seen()
    generator = torch.Generator().manual_seed(0)
    cuts = [(p, t, 0) for p, t in paths] + catch.cuts
    for q, k, v in catch.calls:
        call: dict[str, dict[str, frozenset[int]]] = {}
        for role, operand in zip(QKV, (q, k, v)):
            by_path: dict[str, set[int]] = {}
            if isinstance(operand, torch.Tensor) and operand.requires_grad:
                tensors = [t for _, t, _ in cuts]
                cot = torch.randn(operand.shape, generator=generator, dtype=operand.dtype)
                grads = torch.autograd.grad(operand, tensors, cot, retain_graph=True, allow_unused=True)
                for (path, _, first), grad in zip(cuts, grads):
                    if grad is None:
                        continue
                    hit = grad.reshape(-1, grad.shape[-1]).abs().sum(0) != 0
                    if hit.any():
                        by_path.setdefault(path, set()).update((hit.nonzero().flatten() + first).tolist())
            call[role] = {p: frozenset(c) for p, c in by_path.items()}
        seen.calls.append(call)
    return seen


def surgery_view(facts) -> dict[tuple[str, str], frozenset[int]]:
    """(path, q/k/v role) -> channels, from surgery's facts (a site's slices, or its whole output)."""
    out: dict[tuple[str, str], frozenset[int]] = {}
    for path, roles in facts.roles.items():
        for role in roles:
            if role not in QKV:
                continue
            ranges = facts.slices.get(path, {}).get(role)
            if ranges is None:
                lin = facts.linears.get(path)
                expert = getattr(facts, "experts", {}).get(path)
                width = lin.out_features if lin is not None else expert.out_features if expert is not None else 0
                ranges = ((0, width),)
            out[path, role] = frozenset(c for a, b in ranges for c in range(a, b))
    return out


def mismatches(facts, seen: Seen) -> list[str]:
    """Every "role@path" where surgery's channels differ from the oracle's ("query@model.layers.0.q_proj")."""
    want, got = seen.union(), surgery_view(facts)
    return [f"{key[1].split('.')[1]}@{key[0]}" for key in sorted(set(want) | set(got)) if want.get(key) != got.get(key)]


def compare(facts, seen: Seen) -> tuple[str, str]:
    """('agree' | 'differ', why) of surgery's q/k/v reading against the oracle's."""
    want, got = seen.union(), surgery_view(facts)
    if not seen.calls:
        return ("differ", "oracle saw no attention") if facts.attention else ("agree", "no attention")
    problems = []
    for name in mismatches(facts, seen):
        role, path = name.split("@", 1)
        key = (path, f"attention.{role}")
        problems.append(f"{name}: oracle {len(want.get(key, ()))} ch, surgery {len(got.get(key, ()))} ch")
    if not problems:
        return "agree", ""
    return "differ", f"{len(problems)} mismatches: " + "; ".join(problems[:3])


# ---------------------------------------------------------------------------------------------- one architecture


@dataclass
class Result:
    model_type: str
    variant: str
    status: str  # agree | differ | error | skip
    why: str = ""
    seconds: float = 0.0
    attention: int = 0
    oracle_calls: int = 0
    mismatched: list[str] = field(default_factory=list)  # every "role@path" of a differ (`mismatches`)

    def line(self) -> str:
        return json.dumps(self.__dict__)


def _token_ids(model: nn.Module, length: int = 8) -> torch.Tensor:
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None),
                                                                  "vocab_size", 256)
    return (torch.arange(2 * length) % vocab).reshape(2, length)


def _kosmos2(model: nn.Module) -> tuple[tuple, dict]:
    tokens = model.config.latent_query_num
    ids = _token_ids(model, tokens + 8)
    positions = torch.zeros(ids.shape, dtype=torch.long)
    positions[:, 1:1 + tokens] = 1  # where the image's latent queries go
    return (), {"pixel_values": torch.zeros(2, 3, 64, 64), "input_ids": ids,
                "image_embeds_position_mask": positions, "attention_mask": torch.ones(ids.shape, dtype=torch.long),
                "use_cache": False}


def _lxmert(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    return (), {"input_ids": _token_ids(model), "visual_feats": torch.randn(2, 4, config.visual_feat_dim),
                "visual_pos": torch.rand(2, 4, config.visual_pos_dim),
                "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _qformer(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    return (), {"query_embeds": torch.randn(2, 4, config.hidden_size),  # as BLIP-2 calls it: the queries alone
                "encoder_hidden_states": torch.randn(2, 5, config.encoder_hidden_size)}


def _seggpt(model: nn.Module) -> tuple[tuple, dict]:
    height, width = model.config.image_size if isinstance(model.config.image_size, (list, tuple)) else \
        (model.config.image_size, model.config.image_size)
    image = torch.zeros(2, 3, height // 2, width)  # the prompt's image goes above the input's
    return (), {"pixel_values": image, "prompt_pixel_values": image, "prompt_masks": image}


def _decision_transformer(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    return (), {"states": torch.randn(2, 8, config.state_dim), "actions": torch.randn(2, 8, config.act_dim),
                "returns_to_go": torch.randn(2, 8, 1), "timesteps": torch.arange(8).repeat(2, 1),
                "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _siglip2_image(model: nn.Module) -> dict[str, torch.Tensor]:
    config = getattr(model.config, "vision_config", model.config)
    side = 4  # 4x4 patches of a native-resolution image, flattened
    return {"pixel_values": torch.zeros(2, side * side, config.num_channels * config.patch_size ** 2),
            "pixel_attention_mask": torch.ones(2, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * 2)}


def _siglip2(model: nn.Module) -> tuple[tuple, dict]:
    return (), {"input_ids": _token_ids(model), **_siglip2_image(model)}


def _gemma4_vision(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([cols.flatten(), rows.flatten()], -1)  # (x, y) of each patch
    return (), {"pixel_values": torch.rand(2, side * side, 3 * config.patch_size ** 2),
                "pixel_position_ids": positions.expand(2, -1, -1)}


def _pix2struct(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config.vision_config
    patches = torch.rand(2, 16, config.patch_embed_hidden_size + 2)
    patches[..., 0] = torch.arange(16).div(4, rounding_mode="floor") + 1  # row, column (1-based) and the pixels
    patches[..., 1] = torch.arange(16) % 4 + 1
    return (), {"flattened_patches": patches, "attention_mask": torch.ones(2, 16, dtype=torch.long),
                "decoder_input_ids": _token_ids(model, 5), "use_cache": False}


def _idefics(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    ids = _token_ids(model)
    return (), {"input_ids": ids, "pixel_values": torch.zeros(2, 1, 3, config.vision_config.image_size,
                                                               config.vision_config.image_size),
                "image_attention_mask": torch.ones(2, 8, 1, dtype=torch.long),
                "attention_mask": torch.ones(ids.shape, dtype=torch.long), "use_cache": False}


def _xmod(model: nn.Module) -> tuple[tuple, dict]:
    model.set_default_language(model.config.languages[0])  # X-MOD asks its user for the input language first
    return (), {"input_ids": _token_ids(model), "attention_mask": torch.ones(2, 8, dtype=torch.long),
                "use_cache": False}


def _gemma3n_audio(model: nn.Module) -> tuple[tuple, dict]:
    frames = 32
    return (), {"audio_mel": torch.randn(2, frames, model.config.input_feat_size),
                "audio_mel_mask": torch.zeros(2, frames, dtype=torch.bool)}  # True marks padding


def _vibevoice_encoder(model: nn.Module) -> tuple[tuple, dict]:
    return (), {"hidden_states": torch.randn(2, 1, 3200)}  # mono audio


def _tvp(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    side = config.max_img_size
    ids = _token_ids(model)[:1]  # one clip: the grid's column positions are viewed with batch size 1 in transformers
    return (), {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.long),
                "pixel_values": torch.rand(1, config.num_frames, 3, side, side)}  # a clip of frames


def _gemma4_audio(model: nn.Module) -> tuple[tuple, dict]:
    mels = model.config.subsampling_conv_channels[0]  # the projection after two stride-2 convolutions takes
    frames = 48  # mels // 4 of them: 128 mel bins, as gemma4's feature extractor gives
    return (), {"input_features": torch.randn(2, frames, mels),
                "attention_mask": torch.ones(2, frames, dtype=torch.bool)}


def _granite_speech5(model: nn.Module) -> tuple[tuple, dict]:
    config = getattr(model.config, "encoder_config", model.config)
    width = 4 * config.num_mel_bins  # the feature extractor stacks 4 frames of mel bins into one
    return (), {"input_features": torch.randn(2, 16, width), "attention_mask": torch.ones(2, 16, dtype=torch.long)}


def _fun_asr_nano(model: nn.Module) -> tuple[tuple, dict]:
    width = model.config.num_mel_bins * model.config.num_stacked_frames  # low-frame-rate features: stacked frames
    return (), {"input_features": torch.randn(2, 16, width), "input_features_mask": torch.ones(2, 16, dtype=torch.long)}


def _qwen3_asr(model: nn.Module) -> tuple[tuple, dict]:
    frames = 4 * model.config.n_window  # mel frames padded to whole windows of n_window * 2
    return (), {"input_features": torch.randn(2, model.config.num_mel_bins, frames),
                "input_features_mask": torch.ones(2, frames, dtype=torch.long)}


def _instructblipvideo(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config
    frames, side = 4, config.vision_config.image_size  # the processor samples 4 frames, each num_query_tokens long
    ids = torch.cat([torch.full((2, frames * config.num_query_tokens), config.video_token_id), _token_ids(model)], 1)
    return (), {"pixel_values": torch.rand(2, frames, 3, side, side), "qformer_input_ids": _token_ids(model),
                "input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.long), "use_cache": False}


def _lightglue(model: nn.Module) -> tuple[tuple, dict]:
    return (), {"pixel_values": torch.rand(2, 2, 3, 64, 64)}  # pairs of images to match


def _clap(model: nn.Module) -> tuple[tuple, dict]:
    mels = model.config.audio_config.num_mel_bins
    return (), {"input_ids": _token_ids(model), "attention_mask": torch.ones(2, 8, dtype=torch.long),
                "input_features": torch.rand(2, 1, 256, mels)}  # (batch, 1, time, mel bins), with the text


def _clvp(model: nn.Module) -> tuple[tuple, dict]:
    mels = model.config.decoder_config.feature_size
    return (), {"input_ids": _token_ids(model), "attention_mask": torch.ones(2, 8, dtype=torch.long),
                "input_features": torch.rand(2, mels, 32)}  # the text and a mel spectrogram of the voice


def _voxtral_realtime(model: nn.Module) -> tuple[tuple, dict]:
    mels = model.config.audio_config.num_mel_bins
    return (), {"input_ids": _token_ids(model), "input_features": torch.randn(2, mels, 64), "use_cache": False}


def _codec2(model: nn.Module) -> tuple[tuple, dict]:
    config, frames = model.config, 10  # audio and its semantic features (2 stacked mel frames), frame for frame
    return (), {"input_values": torch.randn(2, 1, frames * config.hop_length),
                "input_features": torch.randn(2, frames, config.semantic_model_config.feature_projection_input_dim)}


def _vibevoice_decoder(model: nn.Module) -> tuple[tuple, dict]:
    return (), {"hidden_states": torch.randn(2, model.config.hidden_size, 4)}  # latent frames, channels first


def _nemotron_word_timestamp(model: nn.Module) -> tuple[tuple, dict]:
    return (), {"inputs_embeds": torch.randn(2, 8, model.config.hidden_size),  # the speech encoder's states
                "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _muse_glimmer(model: nn.Module) -> tuple[tuple, dict]:
    config, context = model.config, 6  # a drafter: noisy block embeddings and the target's accepted context
    return (), {"noise_embeds": torch.randn(2, config.block_size, config.hidden_size),
                "context_hidden_states": torch.randn(2, context, config.hidden_size * len(config.target_layer_ids)),
                "attention_mask": torch.ones(2, context + config.block_size, dtype=torch.long),  # context and block
                "position_ids": torch.arange(context + config.block_size).expand(2, -1), "use_cache": False}


def _step3p7(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config  # 4 image tokens an image at the tiny size, ahead of the text
    ids = torch.cat([torch.full((2, 4), config.image_token_id), _token_ids(model)], 1)
    return (), {"input_ids": ids, "pixel_values": torch.rand(2, 3, 64, 64),
                "attention_mask": torch.ones(ids.shape, dtype=torch.long), "use_cache": False}


def _pi0(model: nn.Module) -> tuple[tuple, dict]:
    config = model.config  # a robot policy: one camera's image tokens and a prompt, the state, noisy actions
    vision = config.vlm_config.vision_config
    side, tokens = vision.image_size, (vision.image_size // vision.patch_size) ** 2
    ids = torch.cat([torch.full((2, tokens), config.vlm_config.image_token_id), _token_ids(model)], 1)
    kwargs = {"input_ids": ids, "pixel_values": torch.rand(2, 1, 3, side, side),
              "pixel_attention_mask": torch.ones(2, 1, dtype=torch.bool),
              "attention_mask": torch.ones(ids.shape, dtype=torch.long),
              "noise": torch.randn(2, config.chunk_size, config.max_action_dim), "timestep": torch.full((2,), 0.5),
              "use_cache": False}
    if hasattr(config, "max_state_dim"):  # pi0 takes the state as an input; pi05 as text
        kwargs["state"] = torch.randn(2, config.max_state_dim)
    return (), kwargs


INPUTS = {"kosmos-2": _kosmos2, "lxmert": _lxmert, "blip_2_qformer": _qformer, "seggpt": _seggpt,
          "decision_transformer": _decision_transformer, "siglip2": _siglip2, "gemma4_vision": _gemma4_vision,
          "siglip2_vision_model": lambda model: ((), _siglip2_image(model)), "pix2struct": _pix2struct,
          "idefics": _idefics, "xmod": _xmod, "gemma3n_audio": _gemma3n_audio,
          "vibevoice_acoustic_tokenizer_encoder": _vibevoice_encoder, "tvp": _tvp,
          "gemma4_audio": _gemma4_audio, "granite_speech5_ctc": _granite_speech5,
          "granite_speech5_encoder": _granite_speech5, "fun_asr_nano_encoder": _fun_asr_nano,
          "qwen3_asr_encoder": _qwen3_asr, "instructblipvideo": _instructblipvideo,
          "lightglue": _lightglue, "clap": _clap, "clvp": _clvp, "voxtral_realtime": _voxtral_realtime,
          "xcodec2": _codec2, "neucodec": _codec2, "vibevoice_acoustic_tokenizer_decoder": _vibevoice_decoder,
          "nemotron3_5_transcribe_word_timestamp": _nemotron_word_timestamp, "muse_glimmer_assistant": _muse_glimmer,
          "step3p7": _step3p7, "pi0": _pi0, "pi05": _pi0}
"""model_type -> the inputs a user gives (surgery cannot make them from the config): the zoo passes them to the
analysis as a user would, on every variant."""


def check(model_type: str, variants=("sdpa", "eager", "sdpa+mask", "eager+mask")) -> list[Result]:
    """Build `model_type` once, then per variant: surgery's facts against the oracle."""
    from surgery.analysis import facts as facts_module
    from surgery.analysis.report import sites_of
    from surgery.analysis.tracing import input_candidates

    try:
        model = build(model_type)
    except Exception as exc:
        return [Result(model_type, "build", "skip", _why(exc))]
    results = []
    for variant in variants:
        attn, _, mask = variant.partition("+")
        if not set_attention(model, attn):
            results.append(Result(model_type, variant, "skip", f"{attn} not supported"))
            continue
        try:
            candidates = [INPUTS[model_type](model)] if model_type in INPUTS else input_candidates(model)
        except Exception as exc:
            results.append(Result(model_type, variant, "error", "inputs: " + _why(exc)))
            continue
        try:
            args, kwargs = runnable_inputs(model, candidates)
            runnable = True
        except Exception as exc:
            args, kwargs, runnable, run_error = candidates[0][0], candidates[0][1], False, _why(exc)
        if mask:
            args2, kwargs2 = padded(kwargs, args, model)
            if "attention_mask" not in kwargs2:
                results.append(Result(model_type, variant, "skip", "no attention_mask input"))
                continue
            args, kwargs = args2, kwargs2
        start = time.perf_counter()
        try:
            facts_module._CACHE.clear()  # surgery's own inputs unless the variant brings a mask; timed as inspect
            given = (None, None) if not mask and model_type not in INPUTS else (args, kwargs)
            sites_of(model, *given)
            facts = facts_module.analyze(model, *given)  # from the cache
        except Exception as exc:
            seconds = time.perf_counter() - start
            try:  # a tiny build that does not run on the inputs is no finding about surgery
                runnable_inputs(model, [(args, kwargs)])
            except Exception as run_exc:
                results.append(Result(model_type, variant, "skip", "the tiny build does not run: " + _why(run_exc),
                                      seconds))
                continue
            results.append(Result(model_type, variant, "error", "analyze: " + _why(exc), seconds))
            continue
        seconds = time.perf_counter() - start
        if not runnable:
            results.append(Result(model_type, variant, "skip", "oracle: no candidate input runs: " + run_error,
                                  seconds, len(facts.attention)))
            continue
        if not mask and (args, kwargs) is not candidates[0] and _first_index(candidates, args, kwargs) != 0:
            facts = facts_module.analyze(model, args, kwargs)  # compare on the inputs the model really runs on
        try:
            seen = oracle(model, args, kwargs)
        except Exception as exc:
            results.append(Result(model_type, variant, "skip", "oracle: " + _why(exc), seconds,
                                  len(facts.attention)))
            continue
        status, why = compare(facts, seen)
        results.append(Result(model_type, variant, status, why, seconds, len(facts.attention), len(seen.calls),
                              mismatches(facts, seen) if status == "differ" else []))
    return results


def _first_index(candidates: list, args: tuple, kwargs: dict) -> int:
    return next((i for i, (a, k) in enumerate(candidates) if a is args and k is kwargs), -1)


def runnable_inputs(model: nn.Module, candidates: list) -> tuple[tuple, dict]:
    """The first candidate inputs the model really runs on."""
    error: Exception | None = None
    for args, kwargs in candidates:
        try:
            with torch.no_grad():
                model(*args, **kwargs)
            return args, kwargs
        except Exception as exc:
            error = error or exc
    raise error or RuntimeError("no candidate inputs")


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


_ACCEPTED_SKIPS = ("sdpa not supported", "no attention_mask input", "eager not supported")


def architecture_status(results: list[dict]) -> tuple[str, str]:
    """One status per architecture from its variants' results: skip (does not build), error (some variant
    fails), differ (some variant disagrees with the oracle), unverified (surgery's reading could not be checked:
    the model does not run on the inputs, or the oracle failed), agree."""
    first = results[0]
    if first["variant"] == "build":
        return "skip", first["why"]
    if first["variant"] == "all":
        return "error", first["why"]
    for status in ("error", "differ"):
        bad = [r for r in results if r["status"] == status]
        if bad:
            return status, f"{bad[0]['variant']}: {bad[0]['why']}"
    odd = [r for r in results if r["status"] == "skip" and not r["why"].startswith(_ACCEPTED_SKIPS)]
    if odd:
        return "unverified", f"{odd[0]['variant']}: {odd[0]['why']}"
    return ("agree", "") if any(r["status"] == "agree" for r in results) else ("skip", "no variant ran")


def summary(path: str) -> None:
    """The zoo's counts by status, the reasons, and the analysis times, from a file of `main`'s JSON lines."""
    import collections
    import statistics

    by_type: dict[str, list[dict]] = {}
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        by_type.setdefault(row["model_type"], []).append(row)
    statuses = {t: architecture_status(rows) for t, rows in by_type.items()}
    counts = collections.Counter(status for status, _ in statuses.values())
    print(f"{len(by_type)} architectures: " + ", ".join(f"{counts[s]} {s}" for s in
                                                       ("agree", "differ", "unverified", "error", "skip")))
    variants = collections.Counter((r["variant"], r["status"]) for rows in by_type.values() for r in rows
                                   if r["variant"] not in ("build", "all"))
    print("variants: " + ", ".join(f"{v} {st} {n}" for (v, st), n in sorted(variants.items())))
    for status in ("differ", "unverified", "error", "skip"):
        reasons = collections.Counter()
        for t, (st, why) in statuses.items():
            if st == status:
                reasons[why[:110]] += 1
        print(f"\n{status} ({counts[status]}):")
        if status in ("differ", "unverified", "error"):
            for t, (st, why) in sorted(statuses.items()):
                if st == status:
                    print(f"  {t}: {why[:170]}")
        else:
            for why, n in reasons.most_common(12):
                print(f"  {n:3d} x {why}")
    times = [r["seconds"] for rows in by_type.values() for r in rows
             if r["variant"] in ("sdpa", "eager") and r.get("seconds")]
    if times:
        slow = sorted(((r["seconds"], t, r["variant"]) for t, rows in by_type.items() for r in rows
                       if r["variant"] in ("sdpa", "eager") and r.get("seconds")), reverse=True)[:5]
        print(f"\ninspect with surgery's own inputs, cold (failures included), {len(times)} runs: median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s; slowest: " + ", ".join(f"{t} {v} {s:.1f} s" for s, t, v in slow))


def main(argv: list[str]) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)
    import signal

    def alarm(*_):
        raise TimeoutError("over 120 s")

    signal.signal(signal.SIGALRM, alarm)
    if argv[:1] == ["--summary"]:
        summary(argv[1])
        return
    types = argv or model_types()
    for model_type in types:
        signal.alarm(120)
        try:
            for result in check(model_type):
                print(result.line(), flush=True)
        except BaseException:  # never stop the sweep
            print(json.dumps({"model_type": model_type, "variant": "all", "status": "error",
                              "why": traceback.format_exc().splitlines()[-1][:200]}), flush=True)
        finally:
            signal.alarm(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
