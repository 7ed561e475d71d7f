"""Tracing a model for analysis: example inputs and a non-strict pre-dispatch `torch.export` graph.

The graph is read, never executed as the model: it is traced on fake tensors (a meta model is fine), and the
model is left exactly as it was (modes restored, also on exceptions).
"""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn

from surgery.analysis.stand_ins import analysis_stand_ins

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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[tuple, dict]:
    """Example inputs for a transformers PreTrainedModel, on the model's device (meta ok).

    Decoder-only: input_ids. Encoder-only (a config with `type_vocab_size`): input_ids and token_type_ids.
    Encoder-decoder: input_ids and a shorter decoder_input_ids. `use_cache=False` where the forward takes it.
    Raises TypeError for any other module: give it example args/kwargs yourself.
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
    vocab = int(getattr(config, "vocab_size", None) or 2)
    params = inspect.signature(model.forward).parameters

    def ids(length: int) -> torch.Tensor:
        return (torch.arange(batch * length) % vocab).reshape(batch, length).to(device)

    kwargs: dict[str, Any] = {}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids(seq // 2 + 1)
    elif getattr(config, "type_vocab_size", 0) and "token_type_ids" in params:
        kwargs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long, device=device)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return (ids(seq),), kwargs


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


def export_for_analysis(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> AnalysisTrace:
    """Trace `model` with a non-strict pre-dispatch `torch.export` (inputs from `example_inputs` if none given)."""
    if args is None and kwargs is None:
        args, kwargs = example_inputs(model)
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    with eval_mode(model), _no_stack_traces():
        try:
            program = torch.export.export(model, args, kwargs, strict=False)
        except Exception:  # retry with the stand-ins weight formats offer for layers export cannot trace
            with analysis_stand_ins(model) as swapped:
                if not swapped:
                    raise
                program = torch.export.export(model, args, kwargs, strict=False)
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
                         constants=constants)
