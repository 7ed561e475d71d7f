"""Tracing a model for analysis: example inputs and a non-strict pre-dispatch `torch.export` graph.

The graph is read, never executed as the model: it is traced on fake tensors (a meta model is fine), and the
model is left exactly as it was (modes restored, also on exceptions). Where the model's code branches on a value
of the data (LED: `if mask.any():`), the branch is taken on the inputs' real values, every op then also running on
copies of the real tensors (fake tensors that carry real values, the mode of `torch.export.draft_export`): that
needs real weights, and costs one forward pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from surgery.analysis.fixed_inputs import fixed_inputs, replaced_forward, scalar_buffers, value_inputs
from surgery.analysis.stand_ins import analysis_stand_ins
from surgery.errors import TraceError

TOKEN_INPUT_NAMES: tuple[str, ...] = ("input_ids", "decoder_input_ids")
"""Names of user inputs that carry token ids in transformers models."""

CALL_SUFFIX = re.compile(r"@\d+$")


@dataclass(frozen=True)
class AnalysisTrace:
    """A traced model, with what is needed to map graph nodes back to modules and inputs.

    `module_paths` maps every module path seen in `nn_module_stack` (aliases included) to its canonical name
    (the first name in `named_modules()` of the traced model). `input_kinds` maps each placeholder name to
    "user", "parameter", "buffer", "constant" or another export input kind; `token_inputs` names the user
    inputs carrying token ids. `constants` holds the real values of lifted constant tensors.
    """

    graph_module: fx.GraphModule
    graph: fx.Graph
    module_paths: dict[str, str]
    module_classes: dict[str, str]  # canonical path -> qualified class name
    leaves: frozenset[str]  # canonical paths of modules without children
    input_kinds: dict[str, str]
    token_inputs: frozenset[str]
    constants: dict[str, torch.Tensor]
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)  # placeholder name -> parameter path
    on_values: bool = False  # a branch on the data was taken on the inputs' real values: the graph is theirs alone


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _config_value(config: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """The first of `names` set on `config` or on one of its sub-configs (vision_config, audio_config, ...)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    known = ("vision_config", "audio_config", "encoder_config", "encoder", "speech_config", "text_config")
    others = sorted(n for n in vars(config) if n.endswith("_config") and n not in known)  # semantic_model_config
    for attr in (*known, *others):
        sub = getattr(config, attr, None)
        if sub is not None and sub is not config and hasattr(sub, "to_dict"):
            value = _config_value(sub, names, None)
            if value is not None:
                return value
    return default


def _image_hw(config: Any) -> tuple[int, int]:
    size = _config_value(config, ("image_size", "vision_image_size", "input_size", "img_size", "crop_size"), 224)
    if isinstance(size, dict):
        size = (size.get("height", size.get("shortest_edge", 224)), size.get("width", size.get("shortest_edge", 224)))
    if isinstance(size, (list, tuple)):
        size = tuple(int(s) for s in size[-2:]) if len(size) >= 2 else (int(size[0]), int(size[0]))
        return size  # type: ignore[return-value]
    return int(size), int(size)


def _first_int(value: Any, default: int) -> int:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _video(config: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Video frames [batch, frames, channels, height, width] of the config's frame count and image size."""
    frames = _first_int(_config_value(config, ("num_frames", "frames_per_clip"), 8), 8)
    channels = int(_config_value(config, ("num_channels", "in_channels", "num_input_channels"), 3))
    return torch.zeros(batch, frames, channels, *_image_hw(config), device=device)


def _samples(config: Any) -> int:
    """About 4000 audio samples, a whole number of the config's frames (hop length, samples per token)."""
    hop = _first_int(_config_value(config, ("hop_length", "samples_per_token"), 1), 1)
    return -(-4000 // hop) * hop


def _layouts(name: str, value: torch.Tensor, config: Any) -> list[torch.Tensor]:
    """Other layouts of an input, tried after `_main_tensor`'s: mono audio as [batch, 1, samples] (codecs
    whose first convolution takes one channel), mel features as [batch, mel bins, frames] (convolution first),
    raw audio for an `inputs` that is not token ids (a speech encoder-decoder)."""
    batch = value.shape[0]
    if name == "input_values" and value.dim() == 2:
        return [value[:, None]]
    mels = _config_value(config, ("num_mel_bins",), None)
    if name == "input_features" and value.dim() == 3 and isinstance(mels, int) and value.shape[1] != mels:
        return [torch.zeros(batch, mels, value.shape[1], device=value.device)]
    if name == "inputs" and not value.is_floating_point():
        return [torch.zeros(batch, _samples(config), device=value.device)]
    return []


def _main_tensor(name: str, model: nn.Module, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
    """An example value of the forward argument `name`, from the config's sizes; None for unknown names."""
    config = model.config
    vocab = int(_config_value(config, ("vocab_size",), 2) or 2)
    if name in ("input_ids", "decoder_input_ids", "inputs", "labels") or name.endswith("input_ids"):
        length = seq // 2 + 1 if name == "decoder_input_ids" else seq
        return (torch.arange(batch * length) % vocab).reshape(batch, length).to(device)
    if name in ("pixel_values", "images", "image"):
        channels = int(_config_value(config, ("num_channels", "in_channels", "num_input_channels"), 3))
        return torch.zeros(batch, channels, *_image_hw(config), device=device)
    if name == "pixel_values_videos":
        return _video(config, batch, device)
    if name == "input_features":
        mels = _config_value(config, ("num_mel_bins",), None)
        positions = _config_value(config, ("max_source_positions",), None)
        if mels is not None and positions is not None:  # whisper-like: [batch, mel bins, 2 x positions]
            return torch.zeros(batch, int(mels), 2 * int(positions), device=device)
        per_channel = _config_value(config, ("input_feat_per_channel", "feature_projection_input_dim",
                                             "feature_size", "num_mel_bins"), 80)
        channels = int(_config_value(config, ("input_channels",), 1))
        return torch.zeros(batch, 4 * seq, int(per_channel) * channels, device=device)
    if name == "input_values":
        mels, frames = _config_value(config, ("num_mel_bins",), None), _config_value(config, ("max_length",), None)
        if isinstance(mels, int) and isinstance(frames, int):  # a spectrogram: [batch, frames, mel bins]
            return torch.zeros(batch, frames, mels, device=device)
        channels = _config_value(config, ("audio_channels",), None)
        if isinstance(channels, int):  # an audio codec: [batch, channels, samples]
            return torch.zeros(batch, channels, _samples(config), device=device)
        return torch.zeros(batch, _samples(config), device=device)
    if name in ("past_values", "past_values_padding"):  # time series: [batch, context, channels] or [batch, context]
        length = _first_int(_config_value(config, ("context_length",), 64), 64)
        channels = _config_value(config, ("num_input_channels",), None)
        return torch.zeros(batch, length, *([channels] if isinstance(channels, int) else []), device=device)
    if name == "freq":  # TimesFM: a frequency class per series
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    if name == "bbox":  # layout models: a box per token
        return torch.zeros(batch, seq, 4, dtype=torch.long, device=device)
    return None


def _grid_input(params: Any) -> tuple[str, str] | None:
    """(patches, grid) input names of a vision tower that requires a `grid_thw` beside flattened patches."""
    grid = next((n for n, p in params.items() if n.endswith("grid_thw") and p.default is inspect.Parameter.empty),
                None)
    patches = next((n for n in ("hidden_states", "pixel_values") if n in params), None)
    return (patches, grid) if grid and patches else None


def main_input(model: nn.Module) -> str:
    """The forward argument surgery builds first: the model's `main_input_name` where the forward takes it, else
    the first known input it takes (a grid-taking vision tower's patches)."""
    params = inspect.signature(model.forward).parameters
    grid = _grid_input(params)
    if grid:
        return grid[0]
    main = getattr(model, "main_input_name", "input_ids") or "input_ids"
    if main not in params:
        main = next((n for n in ("input_ids", "pixel_values", "input_features", "input_values") if n in params),
                    main)
    return main


def _patch_grids(model: nn.Module, params: Any, device: torch.device) -> list[dict[str, Any]]:
    """Vision towers that take flattened patches and their (time, height, width) grid (Qwen2-VL's and its kin):
    one image of 4x4 patches (2x2 merged tokens at merge size 2) in each layout such towers read:
    [patches, channels*time*patch*patch], [patches, channels, time, patch, patch], where time is 1
    [patches, channels, patch, patch], and last channels-last pixels of each merged token,
    [tokens, merge*patch, merge*patch, channels] with the grid counted in tokens (Inkling2). The grid is on the cpu
    for a model on the meta device (the trace reads its values, `fixed_inputs`). [] for any other model."""
    names = _grid_input(params)
    if names is None:
        return []
    patches, grid_name = names
    config = model.config
    channels = _first_int(_config_value(config, ("in_channels", "num_channels"), 3), 3)
    frames = _first_int(_config_value(config, ("temporal_patch_size", "patch_temporal"), 1), 1)
    patch = _first_int(_config_value(config, ("patch_size",), 14), 14)
    merge = _first_int(_config_value(config, ("spatial_merge_size", "merge_size", "merge_kernel_size"), 2), 2)
    side = 2 * merge
    shapes = [(channels * frames * patch * patch,), (channels, frames, patch, patch)] + \
        ([(channels, patch, patch)] if frames == 1 else [])
    at = device if device.type != "meta" else torch.device("cpu")  # the grid's values are read: never on meta
    grid = torch.tensor([[1, side, side]], device=at)
    layouts = [(torch.zeros(side * side, *shape, device=device), grid) for shape in shapes]
    layouts.append((torch.zeros(side * side // merge ** 2, merge * patch, merge * patch, channels, device=device),
                    torch.tensor([[1, side // merge, side // merge]], device=at)))  # by merged token (Inkling2)
    out = []
    for pixels, sizes in layouts:
        extra = {patches: pixels, grid_name: sizes}
        if "merge_sizes" in params:
            extra["merge_sizes"] = torch.tensor([merge], device=at)
        out.append(extra)
    return out


def _patch_sizes(model: nn.Module, params: Any, device: torch.device) -> list[dict[str, Any]]:
    """Vision towers (not the whole model: no token ids) that pack images of any size and take each one's size in
    patches as `target_sizes` (MiniCPM-V's): one image of the config's size with its (height, width) in patches
    (on the cpu for a model on the meta device: the trace reads them). [] for any other model."""
    if "target_sizes" not in params or "pixel_values" not in params or "input_ids" in params:
        return []
    config = model.config
    channels = _first_int(_config_value(config, ("num_channels", "in_channels"), 3), 3)
    patch = _first_int(_config_value(config, ("patch_size",), 14), 14)
    height, width = _image_hw(config)
    at = device if device.type != "meta" else torch.device("cpu")
    return [{"pixel_values": torch.zeros(1, channels, height, width, device=device),
             "target_sizes": torch.tensor([[height // patch, width // patch]], device=at)}]


def input_candidates(model: nn.Module, batch: int = 2, seq: int = 8) -> list[tuple[tuple, dict]]:
    """Example inputs to try, best first, for a transformers PreTrainedModel, on the model's device (meta ok).

    The main input from `main_input_name` (token ids, pixel values of the config's image size, audio features or
    samples, time series), every required forward argument it can make, decoder ids for encoder-decoders,
    token_type_ids for encoder-only models, pixel values beside token ids for multimodal models (first with, then
    without), flattened patches with their grid for vision towers that take a `grid_thw` (Qwen2-VL's), one image
    with its size in patches for those that take `target_sizes` (MiniCPM-V's), video frames
    for `pixel_values_videos` and, after images, for `pixel_values` where the config has `num_frames`, other layouts
    of audio inputs after the first (`_layouts`) and an all-ones `input_features_mask` where the forward takes one,
    token ids beside an image main input where the forward takes them (then without), `use_cache=False` wherever the
    forward takes it by name or through **kwargs (then without), an all-ones attention_mask as a fallback. Raises
    TypeError for any other module: give it example args/kwargs yourself.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the tests only
        PreTrainedModel = ()  # type: ignore[assignment]
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{type(model).__qualname__} is not a transformers PreTrainedModel: cannot guess its "
                        "inputs; pass example args/kwargs to the analysis")
    config = model.config
    device = model_device(model)
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    main = main_input(model)
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    grids = _patch_grids(model, params, device) or _patch_sizes(model, params, device)
    base: dict[str, Any] = {}
    for name in dict.fromkeys([main, *required]):
        value = _main_tensor(name, model, batch, seq, device) if not grids else None
        if value is not None:
            base[name] = value
    ids_added = main == "pixel_values" and "input_ids" in params and "input_ids" not in base
    if ids_added:  # an image-to-text model (BLIP, Kosmos-2): token ids beside the image, then the image alone
        base["input_ids"] = _main_tensor("input_ids", model, batch, seq, device)
    text = "input_ids" in base or "inputs" in base
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        base["decoder_input_ids"] = _main_tensor("decoder_input_ids", model, batch, seq, device)
    elif text and getattr(config, "type_vocab_size", 0) and "token_type_ids" in params:
        base["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long, device=device)
    if text and "bbox" in params and "bbox" not in base:  # layout models (BROS needs the boxes)
        base["bbox"] = _main_tensor("bbox", model, batch, seq, device)
    extras: list[dict[str, Any]] = grids or [{}]
    if text and "pixel_values" in params and "pixel_values" not in base \
            and _config_value(config, ("image_size",), None) is not None:
        extras = [{"pixel_values": _main_tensor("pixel_values", model, batch, seq, device)}, {}]
    if text and ("pixel_values" in base or len(extras) > 1):
        image_token = next((getattr(config, n) for n in ("image_token_index", "image_token_id")
                            if isinstance(getattr(config, n, None), int)), None)
        count = next((getattr(config, n) for n in ("num_query_tokens", "image_seq_length")
                      if isinstance(getattr(config, n, None), int)), None)
        key = "input_ids" if "input_ids" in base else None
        if image_token is not None and count and key:  # placeholders the image features replace
            ids = base[key]
            tokens = torch.full((ids.shape[0], count), image_token, dtype=ids.dtype, device=device)
            with_images = torch.cat([tokens, ids.masked_fill(ids == image_token, 0)], dim=1)
            if "pixel_values" in base:
                base[key] = with_images
            else:
                extras = [{**extras[0], key: with_images}, *extras]
    for name, value in list(base.items()):
        extras += [{**e, name: other} for other in _layouts(name, value, config) for e in extras]
    if isinstance(_config_value(config, ("num_frames",), None), int):  # video models: frames after images
        video = {"pixel_values": _video(config, batch, device)}
        extras = [x for e in extras for x in ([e, {**e, **video}] if "pixel_values" in {**base, **e} else [e])]
    if main == "input_ids" and "input_ids" not in base:
        base["input_ids"] = _main_tensor("input_ids", model, batch, seq, device)
    cache = [{"use_cache": False}, {}] if "use_cache" in params or var_kw else [{}]
    masks: list[dict[str, Any]] = [{}]
    with_mask = "attention_mask" in params and text and "attention_mask" not in base
    first_param = next(iter(params), None)
    out = []
    for uc in cache:
        for extra in extras:
            for mask in masks + ([None] if with_mask else []):
                kwargs = {**base, **extra, **(mask or {}), **uc}
                if mask is None:  # all-ones attention masks, as long as the ids given (the decoder's too)
                    ids = kwargs.get("input_ids", kwargs.get("inputs"))
                    kwargs["attention_mask"] = torch.ones(ids.shape, dtype=torch.long, device=device)
                    decoder = kwargs.get("decoder_input_ids")
                    if decoder is not None and "decoder_attention_mask" in params:
                        kwargs["decoder_attention_mask"] = torch.ones(decoder.shape, dtype=torch.long,
                                                                      device=device)
                for full in _with_feature_masks(kwargs, params, device):
                    args = (full.pop(main),) if main in full and main == first_param else ()
                    out.append((args, full))
    if ids_added:
        out += [(args, {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
                for args, kwargs in out]
    return out


def _with_feature_masks(kwargs: dict[str, Any], params: Any, device: torch.device) -> list[dict[str, Any]]:
    """`kwargs` with an all-ones `input_features_mask` where the forward takes one (audio encoders that count
    the frames from it), over the frames on axis 1, then on the last axis; then `kwargs` as it is."""
    features = kwargs.get("input_features")
    if "input_features_mask" not in params or "input_features_mask" in kwargs or not isinstance(
            features, torch.Tensor) or features.dim() < 3:
        return [kwargs]
    lengths = dict.fromkeys([features.shape[1], features.shape[-1]])
    ones = [torch.ones(features.shape[0], n, dtype=torch.long, device=device) for n in lengths]
    return [{**kwargs, "input_features_mask": mask} for mask in ones] + [dict(kwargs)]


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[tuple, dict]:
    """The first of `input_candidates`: the inputs the analysis tries first."""
    return input_candidates(model, batch, seq)[0]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own training flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Skip recording a Python stack trace per graph node (unused by the analysis, ~10% of tracing time)."""
    try:
        from torch.fx import config
    except ImportError:  # an older torch: nothing to switch off
        config = None
    previous = getattr(config, "do_not_emit_stack_traces", None)
    if previous is None:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = previous


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> the first name `named_modules()` gives it."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def _stack_paths(graph: fx.Graph) -> set[str]:
    paths: set[str] = set()
    for node in graph.nodes:
        for fqn, _cls in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(CALL_SUFFIX.sub("", fqn))
    return paths


def _resolve_paths(model: nn.Module, paths: set[str]) -> dict[str, str]:
    canonical = canonical_names(model)
    resolved: dict[str, str] = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            resolved[path] = path
            continue
        resolved[path] = canonical.get(id(module), path)
    return resolved


def _token_inputs(graph: fx.Graph, kinds: dict[str, str]) -> frozenset[str]:
    users = [n for n in graph.nodes if n.op == "placeholder" and kinds.get(n.name) == "user"]
    named = frozenset(n.name for n in users if n.name in TOKEN_INPUT_NAMES)
    if named:
        return named
    for node in users:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point() and val.dtype != torch.bool:
            return frozenset({node.name})
    return frozenset()


def _describe(args: tuple, kwargs: dict, names: list[str]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
        return repr(value)

    positional = [f"{n}={one(a)}" for n, a in zip(names, args)] + [one(a) for a in args[len(names):]]
    return ", ".join(positional + [f"{k}={one(v)}" for k, v in kwargs.items()])


_DATA_DEPENDENT = ("GuardOnDataDependent", "data-dependent", "data dependent")


def data_dependent_text(text: str) -> bool:
    """Whether an error's text (an exception's, or a line `_first_line` made of it) tells of a guard over a value
    of the data (an `if` on `tensor.any().item()`): the one test of it."""
    return any(mark in text for mark in _DATA_DEPENDENT)


def data_dependent(exc: BaseException) -> bool:
    """Whether an export stopped on a guard over a value of the data."""
    return data_dependent_text(f"{type(exc).__name__}: {exc}")


def all_real(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether every parameter, buffer and input tensor holds real values (none on the meta device)."""
    tensors = [*model.parameters(), *model.buffers(),
               *(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))]
    return all(t.device.type != "meta" for t in tensors)


_VALUE_READ = "its data is not allocated yet"
"""The error of Python code reading a fake tensor's data (UDOP indexes by a tuple of tensors it zipped from the
boxes' values): like a data-dependent stop, fixing the value inputs may get past it."""


def _export_once(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram, bool]:
    """Export on fake tensors; where the model's own code branches on a value of the data, export again on the
    inputs' values (then True: the graph holds for these input values). First with the integer inputs whose values
    drive shapes (`fixed_inputs.value_inputs`: a vision tower's `grid_thw`) and the 0-dim integer buffers
    (`fixed_inputs.scalar_buffers`) fixed, on fake tensors, then on the real values too; then, where that fails or
    there is nothing to fix, with every op also run on copies of the real tensors (`_real_values`), so that the
    branch the given inputs take is the one traced (LED: whether any token has global attention). That needs real
    weights and inputs: on the meta device the data-dependent error stands, unless fixing the value inputs is
    enough (on the cpu beside a meta model: tried after any error). A read of a fake tensor's data (`_VALUE_READ`)
    is tried with the value inputs fixed too."""
    names = value_inputs(kwargs)
    try:
        with _partial_graph_unprinted():
            return torch.export.export(model, args, kwargs, strict=False), False
    except Exception as exc:
        fixable = names and (model_device(model).type == "meta" or _VALUE_READ in str(exc))
        if not data_dependent(exc) and not fixable:
            raise
        buffers = scalar_buffers(model)
        real = all_real(model, args, kwargs) and _real_values() is not None
        fixes = [(names, buffers)] if names or buffers else []
        attempts = [(*f, False) for f in fixes] + ([(*f, True) for f in fixes] + [([], [], True)] if real else [])
        errors: list[Exception] = []
        for fixed, scalars, values in attempts:
            try:
                with fixed_inputs(model, kwargs, fixed, scalars) as rest, _partial_graph_unprinted(), \
                        (_real_values() if values else contextlib.nullcontext()):
                    return torch.export.export(model, args, rest, strict=False), True
            except Exception as error:
                errors.append(error)
        if not errors:
            raise
        with contextlib.suppress(AttributeError):  # told in the TraceError: the attempt with the inputs fixed
            exc.on_values = errors[1 if fixes and real else 0]  # type: ignore[attr-defined]
        raise exc from None


def _real_values() -> contextlib.AbstractContextManager | None:
    """Fake tensors that also carry their real values, so a branch on the data is decided as the real inputs
    decide it: the mode `torch.export.draft_export` runs in, without the report it writes (formatting every
    guard's expression, which took 10-40 s on audio codecs), and with the parameters' real values copied
    (`_parameter_values_copied`). None where this torch has no such mode."""
    config = torch._functorch.config
    if not hasattr(config, "fake_tensor_propagate_real_tensors"):
        return None
    return _both(config.patch(fake_tensor_propagate_real_tensors=True), _parameter_values_copied())


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


@contextlib.contextmanager
def _parameter_values_copied() -> Iterator[None]:
    """torch (2.13) gives a fake parameter an uninitialized real tensor: its copy helpers take only tensors whose
    type is exactly `torch.Tensor`, not `nn.Parameter`, so every value computed from a weight was garbage and a
    branch on it (FastSpeech2's predicted durations) went either way. Inside the block a parameter is copied as
    the plain tensor its `.detach()` is. A torch without these helpers is left as it is."""
    from torch._subclasses import meta_utils

    names = [n for n in ("_safe_copy", "_safe_clone") if callable(getattr(meta_utils, n, None))]
    originals = {n: getattr(meta_utils, n) for n in names}

    def plain(src: Any) -> Any:
        return src.detach() if type(src) is nn.Parameter else src

    replacements = {"_safe_copy": lambda dst, src: originals["_safe_copy"](dst, plain(src)),
                    "_safe_clone": lambda src: originals["_safe_clone"](plain(src))}
    try:
        for n in names:
            setattr(meta_utils, n, replacements[n])
        yield
    finally:
        for n, original in originals.items():
            setattr(meta_utils, n, original)


@contextlib.contextmanager
def _partial_graph_unprinted() -> Iterator[None]:
    """torch.export prints the partial graph of a failed export to stderr (thousands of lines for a model that
    branches on data, before surgery retries it): keep everything else export writes there, drop that graph."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException as exc:
        text = captured.getvalue()
        partial = getattr(exc, "partial_fx_graph", None)
        if partial is not None:
            text = text.replace(f"{partial}\n", "")  # printed once per nested export call
        sys.stderr.write(text)
        raise
    sys.stderr.write(captured.getvalue())


_GUARD_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export._draft_export")


@contextlib.contextmanager
def _quiet_guard_logs() -> Iterator[None]:
    """torch logs warnings on data-dependent guards (the symbol's source not found, the branch taken on real
    values): the analysis handles those itself, so they are kept below the user's eyes."""
    loggers = [logging.getLogger(name) for name in _GUARD_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _traceable_experts(model: nn.Module) -> Iterator[bool]:
    """transformers' eager experts loop (`for expert in hit: ... tensor[expert]`) indexes by a value of the data,
    which export cannot follow even on real values (an unbacked index's storage offset): where the model's experts
    run eagerly and it can switch them, inside the block they run as `grouped_mm` (the same weights, one batched
    product; gpt-oss's default), and the model's own choice is put back on exit. Yields whether it switched."""
    get = getattr(model, "get_experts_implementation", None)
    can = getattr(model, "_can_set_experts_implementation", None)
    try:
        before = get() if callable(get) and callable(can) and can() else {}
    except Exception:  # a model whose config has no such setting
        before = {}
    if "eager" not in before.values():
        yield False
        return
    try:
        model.set_experts_implementation("grouped_mm")
    except (ValueError, ImportError, RuntimeError):  # grouped_mm not available here
        model.set_experts_implementation(before)
        yield False
        return
    try:
        yield True
    finally:
        model.set_experts_implementation(before)


def _unknown_output(exc: BaseException) -> bool:
    """Whether export stopped on an object of a type it cannot flatten in the model's output (a cache)."""
    return "in output, which is not a known type" in str(exc)


def _tensors_only(value: Any) -> Any:
    """`value` with only its tensors kept: dicts (a ModelOutput too), lists and tuples of them, nested."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        kept = {k: _tensors_only(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(value, (list, tuple)):
        kept = [_tensors_only(v) for v in value]
        return tuple(v for v in kept if v is not None)
    return None


@contextlib.contextmanager
def _tensor_outputs(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model.forward` returns only the tensors of its output: a model that returns an object
    export cannot flatten (PI0.5 builds a `DynamicCache` and returns it whatever `use_cache` says) traces, and
    the analysis reads the graph, not the output. The model's own forward is put back on exit."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return _tensors_only(original(*args, **kwargs))

    forward.tensors_only = True  # type: ignore[attr-defined]
    with replaced_forward(model, forward):
        yield


def _export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram, bool]:
    with eval_mode(model), _no_stack_traces(), _quiet_guard_logs(), _conversions_kept():
        try:
            return _export_once(model, args, kwargs)
        except Exception as exc:
            if _unknown_output(exc) and not getattr(model.forward, "tensors_only", False):
                with _tensor_outputs(model):
                    return _export(model, args, kwargs)
            if data_dependent(exc):
                with _traceable_experts(model) as switched:
                    if switched:
                        with contextlib.suppress(Exception):
                            return _export_once(model, args, kwargs)
            # retry with the stand-ins weight formats offer for layers export cannot trace
            with analysis_stand_ins(model) as swapped:
                if not swapped:
                    raise
                return _export_once(model, args, kwargs)


@contextlib.contextmanager
def _conversions_kept() -> Iterator[None]:
    """Inside the block, `module.to(...)` that changes no parameter's or buffer's dtype or device returns the
    module as it is. SwitchTransformers' router calls `self.classifier.to(float32)` in its forward; under export
    the parameters are wrapper tensors, which `Module._apply` swaps in place, and a swap of a parameter that has a
    weak reference fails ("Couldn't swap Linear.weight") though nothing would change."""
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        target = _conversion(args, kwargs)
        if target is not None and all(_converted_as_is(t, *target) for t in [*self.parameters(), *self.buffers()]):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


def _conversion(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None] | None:
    """The (device, dtype) a `Module.to(...)` call asks for; None for a call it does not read plainly (a memory
    format, an unknown argument), left to the real `to`."""
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if set(kwargs) - {"device", "dtype", "non_blocking"}:
        return None
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
        elif isinstance(arg, (torch.device, str, int)) and not isinstance(arg, bool):
            device = arg
        elif not isinstance(arg, bool):
            return None
    try:
        return (torch.device(device) if device is not None else None), dtype
    except (RuntimeError, TypeError):
        return None


def _converted_as_is(tensor: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Whether `Module.to(device, dtype)` leaves `tensor` as it is (dtype applies to floating and complex only)."""
    if device is not None and (tensor.device.type != device.type
                               or (device.index is not None and tensor.device.index != device.index)):
        return False
    return dtype is None or not (tensor.is_floating_point() or tensor.is_complex()) or tensor.dtype == dtype


_CAUSED_BY = re.compile(r"Caused by: \((\S+\.py:\d+) in (\w+)\)")


def _first_line(exc: BaseException) -> str:
    """The error's first line, and for a data-dependent guard the model code that branched; where the branch could
    not be taken on the real values either, that second error too, with the line of the model's code it
    stopped at."""
    text = str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    where = _CAUSED_BY.search(text)
    at = f" (at {where.group(1)} in {where.group(2)})" if where else ""
    line = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}{at}"
    second = getattr(exc, "on_values", None)
    if isinstance(second, BaseException):
        second_lines = [s for s in str(second).splitlines() if s.strip()]
        frame = _model_frame(second)
        line += (f"; on the real values: {type(second).__name__}: {second_lines[0][:200] if second_lines else ''}"
                 + (f" (at {frame})" if frame else ""))
    return line


def _model_frame(exc: BaseException) -> str | None:
    """The last frame of the traceback outside torch and surgery: the model's code that was running."""
    import traceback

    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else None


def _branch_advice(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
                   which: str = "surgery.inspect(model, kwargs={...})") -> str:
    """What to do about a data-dependent branch that export could not take; `which`: the inputs to pass."""
    if not all_real(model, args, kwargs or {}):
        return ("; surgery takes such a branch on the real values of the inputs, but the model (or an input) is on "
                f"the meta device: load real weights, or pass inputs for which that branch is fixed ({which})")
    return ("; it could not be taken on the inputs' real values either (the error on them follows): pass inputs "
            f"for which that branch is fixed ({which}); where no input fixes it (a loop over the experts the tokens "
            "reach, in a mixture-of-experts model without a batched experts implementation), torch.export cannot "
            "trace the model's code as it is")


def export_for_analysis(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None,
                        failed: list[str] | None = None) -> AnalysisTrace:
    """Trace `model` with a non-strict pre-dispatch `torch.export`.

    Without inputs, the `input_candidates` are tried in order; if none traces, a TraceError names the model, the
    inputs tried with each one's error, and the forward's main input, so the caller can pass inputs (the errors
    are on the exception as `tried`). `failed`: the `tried` of an earlier attempt on a depth-reduced view of
    the same model; an error that inputs give here as they gave it there is one the depth did not change, and
    inputs that gave it there are not tried again (their earlier error stands). Others are: a depth-reduced
    stack of downsampling blocks (XCodec's semantic feature extractor) changes the lengths two branches join at."""
    if args is None and kwargs is None:
        candidates = input_candidates(model)
        names = list(inspect.signature(model.forward).parameters)
        errors: list[str] = []
        alike: set[str] = set()  # errors the depth did not change
        program = None
        for i, (cand_args, cand_kwargs) in enumerate(candidates):
            prefix = f"({_describe(cand_args, cand_kwargs, names)}): "
            before = failed[i][len(prefix):] if failed and i < len(failed) and failed[i].startswith(prefix) else None
            if before is not None and before in alike:
                errors.append(prefix + before)
                continue
            try:
                program, on_values = _export(model, cand_args, cand_kwargs)
                break
            except Exception as exc:  # try the next inputs
                errors.append(prefix + _first_line(exc))
                if before is not None and errors[-1] == prefix + before:
                    alike.add(before)
        if program is None:
            params = names
            main = main_input(model)
            branched = any(data_dependent_text(e) for e in errors)
            hint = (" The trace stopped on a data-dependent branch of the model's own code (a value of an input "
                    f"decides the control flow){_branch_advice(model)}."
                    if branched else
                    " Pass example inputs as surgery.inspect(model, args=..., kwargs={...}) (or plan/attach).")
            error = TraceError(
                f"cannot trace {type(model).__qualname__} for analysis with the inputs surgery makes for it "
                f"(main input {main!r}; forward takes {', '.join(params[:12])}).{hint} Tried:\n  "
                + "\n  ".join(errors))
            error.tried = errors  # type: ignore[attr-defined]
            raise error
    else:
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        params = inspect.signature(model.forward).parameters
        names = list(params)
        tries = [kwargs]
        if "use_cache" not in kwargs and ("use_cache" in params
                                          or any(p.kind is p.VAR_KEYWORD for p in params.values())):
            tries.insert(0, {**kwargs, "use_cache": False})  # a cache in the output is neither traceable nor needed
        for attempt, given in enumerate(tries):
            try:
                program, on_values = _export(model, args, given)
                break
            except Exception as exc:
                line = _first_line(exc)
                if data_dependent_text(line):
                    raise TraceError(
                        f"cannot trace {type(model).__qualname__} for analysis with the inputs given: the trace "
                        "stopped on a data-dependent branch of the model's own code (a value of an input decides "
                        "the control flow)"
                        + _branch_advice(model, args, kwargs, "often a mask the model otherwise computes from the "
                                         "ids, e.g. decoder_attention_mask")
                        + f". Inputs ({_describe(args, kwargs, names)}): {line}") from exc
                if attempt + 1 == len(tries):
                    raise TraceError(f"cannot trace {type(model).__qualname__} for analysis with the inputs given "
                                     f"({_describe(args, kwargs, names)}): {line}") from exc
    graph_module = program.graph_module
    graph = graph_module.graph
    kinds: dict[str, str] = {}
    targets: dict[str, str] = {}
    for spec in program.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        kinds[name] = {"USER_INPUT": "user", "PARAMETER": "parameter", "BUFFER": "buffer",
                       "CONSTANT_TENSOR": "constant"}.get(spec.kind.name, spec.kind.name.lower())
        if spec.target is not None:
            targets[name] = spec.target
    constants = {name: program.constants[target] for name, target in targets.items()
                 if kinds[name] == "constant" and isinstance(program.constants.get(target), torch.Tensor)}
    module_paths = _resolve_paths(model, _stack_paths(graph))
    canonical = canonical_names(model)
    classes = {name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()}
    leaves = frozenset(canonical[id(m)] for _, m in model.named_modules() if next(m.children(), None) is None)
    return AnalysisTrace(graph_module=graph_module, graph=graph, module_paths=module_paths, module_classes=classes,
                         leaves=leaves, input_kinds=kinds, token_inputs=_token_inputs(graph, kinds),
                         constants=constants,
                         parameters={n: t for n, t in targets.items() if kinds.get(n) == "parameter"},
                         on_values=on_values)
