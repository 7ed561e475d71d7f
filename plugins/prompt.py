"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): N virtual tokens prepended at the model's input
embedding (the site with role `embedding.input`; for encoder-decoders, the encoder's).

How the virtual tokens get in: a forward pre-hook on the model (the encoder for encoder-decoders) prepends N
placeholder ids to `input_ids`, so everything the model derives from the ids (lengths, positions, rotary, masks)
already counts the virtual positions, and arms the branch at the embedding site, which replaces the placeholders'
embeddings by the learned prompt. The same hook extends `attention_mask` (ones), `position_ids` (virtual tokens at
0..N-1, the given ones shifted by N), `token_type_ids` (zeros) and `labels` (-100). Given `inputs_embeds` instead,
it prepends the prompt to them directly. A call that continues a cache (`generate()` after its first step) adds no
virtual tokens, as they are in the cache, but still extends the mask and shifts positions.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import surgery
from surgery.plugin import (
    Branch,
    Method,
    MethodParams,
    Site,
    SurgeryError,
    branch_dtype,
    first_float_dtype,
    input_of,
    module_device,
)
from surgery_plugins.prefix import freeze_reparam  # noqa: F401  (re-exported: it folds P-tuning encoders too)


class PromptParams(MethodParams):
    """`num_virtual_tokens`: N. `init`: `random` (normal, with the std of the embedding table), `vocab` (the
    embeddings of N random token ids) or `ids` (the embeddings of `init_ids`, e.g. a tokenized task description,
    repeated or cut to N). `strip`: drop the virtual positions from the outputs (decoder-only and encoder-only
    models). `dtype`: the parameters' dtype (default: the embedding's)."""

    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "vocab", "ids"] = "random"
    init_ids: list[int] | None = None
    strip: bool = False
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @model_validator(mode="after")
    def _ids(self) -> "PromptParams":
        if self.init == "ids" and not self.init_ids:
            raise ValueError("init 'ids' needs init_ids (token ids of the initial prompt text)")
        if self.init_ids and self.init != "ids":
            raise ValueError("init_ids is given, so set init: ids")
        return self


class PTuningParams(MethodParams):
    """`num_virtual_tokens`: N. `encoder`: the prompt encoder over N learned inputs, `mlp` (3 linear layers with
    ReLU) or `lstm` (a 2-layer bidirectional LSTM and a 2-layer MLP head), hidden size `encoder_hidden`. Fold it
    with `freeze_reparam` for inference. `strip`, `dtype`: as for prompt tuning."""

    num_virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden: int = Field(128, gt=0)
    strip: bool = False
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None


class LstmEncoder(nn.Module):
    """P-tuning's prompt encoder: bidirectional LSTM over the inputs, then Linear-ReLU-Linear back to dim."""

    def __init__(self, dim: int, hidden: int, dtype: torch.dtype, device: Any):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype, device=device)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden, dtype=dtype, device=device), nn.ReLU(),
                                  nn.Linear(hidden, dim, dtype=dtype, device=device))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(inputs.unsqueeze(0))[0].squeeze(0))


def prompt_encoder(kind: str, dim: int, hidden: int, dtype: torch.dtype, device: Any) -> nn.Module:
    if kind == "lstm":
        return LstmEncoder(dim, hidden, dtype, device)
    return nn.Sequential(nn.Linear(dim, hidden, dtype=dtype, device=device), nn.ReLU(),
                         nn.Linear(hidden, hidden, dtype=dtype, device=device), nn.ReLU(),
                         nn.Linear(hidden, dim, dtype=dtype, device=device))


class PromptBranch(Branch):
    """The virtual-token embeddings of one model input: a plain [N, dim] prompt, or a prompt encoder over learned
    inputs. While `pending` > 0 the next embedding call has N placeholder positions at `offset` (0 unless another
    prompt attachment's placeholders were put in front of them), which it overwrites."""

    def __init__(self, site: str, prompt: torch.Tensor, encoder: nn.Module | None, strip: bool):
        super().__init__()
        self.site, self.strip, self.length = site, strip, prompt.shape[0]
        self.encoder = encoder
        if encoder is None:
            self.prompt, self.inputs = nn.Parameter(prompt), None
        else:
            self.prompt, self.inputs = None, nn.Parameter(prompt)
        self.pending = 0
        self.offset = 0

    def embeddings(self) -> torch.Tensor:
        """The virtual tokens' embeddings, [N, dim]."""
        return self.prompt if self.encoder is None else self.encoder(self.inputs)

    @torch.no_grad()
    def fold_reparam(self) -> bool:
        """Replace the prompt encoder by the prompt it produces now (same outputs; irreversible). False if none."""
        if self.encoder is None:
            return False
        prompt, trainable = self.embeddings().detach().clone(), self.inputs.requires_grad
        del self.encoder, self.inputs
        self.encoder, self.inputs = None, None
        self.prompt = nn.Parameter(prompt, requires_grad=trainable)
        return True

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if not self.pending:
            return out
        self.pending -= 1
        offset, self.offset = self.offset, 0
        seq = input_of(args, kwargs).dim() - 1
        if out.shape[seq] < offset + self.length:
            raise SurgeryError(f"prompt at site {self.site!r}: the embedding call has {out.shape[seq]} positions, "
                               f"fewer than the {offset + self.length} virtual tokens")
        prompt = self.embeddings().to(out.dtype)
        prompt = prompt.view((1,) * seq + prompt.shape).expand(*out.shape[:seq], -1, -1)
        end = offset + self.length
        return torch.cat([out.narrow(seq, 0, offset), prompt, out.narrow(seq, end, out.shape[seq] - end)], dim=seq)


# -- the model-level hook ------------------------------------------------------------------------------------------

class _Call:
    """A module call bound to its forward signature: read and replace arguments by name. `result()` passes the
    arguments the way they came (positional ones positionally), so wrappers that add keywords keep working."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        self.bound = signature.bind(*args, **kwargs)
        params = list(signature.parameters.values())
        self.var = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                             inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.positional = set(positional[:len(args)])

    def get(self, name: str) -> Any:
        found = self.bound.arguments
        if name in found and name != self.var:
            return found[name]
        return found.get(self.var, {}).get(name) if self.var else None

    def set(self, name: str, value: Any) -> None:
        if name in self.bound.arguments and name != self.var:
            self.bound.arguments[name] = value
        else:
            self.bound.arguments[self.var][name] = value

    def result(self) -> tuple[tuple, dict]:
        args: list = []
        kwargs: dict = {}
        for param in self.bound.signature.parameters.values():
            if param.name not in self.bound.arguments:
                continue
            value = self.bound.arguments[param.name]
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            elif param.name in self.positional:
                args.append(value)
            else:
                kwargs[param.name] = value
        return tuple(args), kwargs


CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.25 names the argument `cache`; older ones the second


def _cached(cache: Any) -> int:
    """How many positions a cache already holds (0 for none)."""
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def _ones_before(mask: torch.Tensor, n: int, site: str) -> torch.Tensor:
    if mask.dim() != 2:
        raise SurgeryError(f"prompt at site {site!r}: virtual tokens need a 2-D attention_mask [batch, seq], got "
                           f"{mask.dim()}-D")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _strip(out: Any, n: int, real: int) -> Any:
    """Drop the n virtual positions in front of the `real` ones from the per-token outputs. An output that keeps
    only its last k positions (`logits_to_keep`, as `generate()` asks) holds max(0, k - real) of them."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:, max(0, min(n, t.shape[1] - real)):] if t.dim() >= 2 else t

    if isinstance(out, torch.Tensor):
        return cut(out)
    for field in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, field, None), torch.Tensor):
            out[field] = cut(out[field])
    if isinstance(getattr(out, "hidden_states", None), tuple):
        out["hidden_states"] = tuple(cut(h) for h in out["hidden_states"])
    return out


class InputHook:
    """Prepends one branch's virtual tokens to the calls of `stack` (the model, or its encoder)."""

    def __init__(self, branch: PromptBranch, stack: nn.Module, labels: bool, model: nn.Module):
        self.branch, self.labels, self.model = branch, labels, model
        self.signature = inspect.signature(stack.forward)
        names = list(self.signature.parameters)
        self.ids_name = "input_ids" if "input_ids" in names else names[0]
        self.calls: list[tuple[bool, int, int]] = []  # per call: (virtual tokens added, pending before, real length)

    def _host(self) -> nn.Module:
        return self.model.get_submodule(self.branch.site)

    def running(self) -> bool:
        """Whether this call gets the virtual tokens: the branch runs; or, while samples are routed to
        attachments (`surgery.per_sample`), every sample takes this one. The tokens lengthen the whole batch, so
        routing only some samples to a prompt attachment is refused."""
        host = self._host()
        routing = getattr(host, "routing", None)
        if routing is None:
            return self.branch.running
        mine = next((n for n, b in getattr(host, "branches", {}).items() if b is self.branch), None)
        takes = {n == mine for n in routing}
        if takes == {True, False}:
            raise SurgeryError(f"prompt attachment {mine!r} at site {self.branch.site!r} is routed to some samples "
                               "only: its virtual tokens lengthen every sample of the batch. Route it to all samples "
                               "or to none (run the others in another batch)")
        return takes == {True}

    def _shift_others(self, n: int) -> None:
        """Placeholders of prompt attachments whose hooks ran before this one's now start n positions later."""
        for other in getattr(self._host(), "branches", {}).values():
            if other is not self.branch and isinstance(other, PromptBranch) and other.pending:
                other.offset += n

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        branch, n = self.branch, self.branch.length
        self.calls.append((False, branch.pending, 0))  # one record per call; `after` pops it even if this raises
        if not self.running():
            return None
        call = _Call(self.signature, args, kwargs)
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        cache = next((c for c in map(call.get, CACHE_NAMES) if c is not None), None)
        if getattr(cache, "is_compileable", False):  # before the mask: transformers < 5.14 pass it 4-D with these
            raise SurgeryError(f"prompt at site {branch.site!r}: static (compileable) caches are sized and masked for "
                               "the real tokens only; use a dynamic cache with virtual tokens")
        if mask is not None:
            call.set("attention_mask", _ones_before(mask, n, branch.site))
        if _cached(cache):  # continuing a cache that holds the virtual tokens already
            if positions is not None:
                call.set("position_ids", positions + n)
            return call.result()
        ids, embeds = call.get(self.ids_name), call.get("inputs_embeds")
        if isinstance(ids, torch.Tensor):
            call.set(self.ids_name, torch.cat([ids[..., :1].expand(*ids.shape[:-1], n), ids], dim=-1))
            shape = ids.shape
        elif isinstance(embeds, torch.Tensor):
            prompt = branch.embeddings().to(embeds.dtype).expand(embeds.shape[0], -1, -1)
            call.set("inputs_embeds", torch.cat([prompt, embeds], dim=1))
            shape = embeds.shape[:2]
        else:
            raise SurgeryError(f"prompt at site {branch.site!r}: the call has neither {self.ids_name} nor inputs_embeds")
        if positions is not None:
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
            call.set("position_ids", torch.cat([virtual, positions + n], dim=-1))
        types = call.get("token_type_ids")
        if isinstance(types, torch.Tensor):
            call.set("token_type_ids", torch.cat([types.new_zeros(*types.shape[:-1], n), types], dim=-1))
        labels = call.get("labels")
        if self.labels and isinstance(labels, torch.Tensor) and labels.shape == shape:
            call.set("labels", torch.cat([labels.new_full((*labels.shape[:-1], n), -100), labels], dim=-1))
        self.calls[-1] = (True, branch.pending, shape[-1])
        if isinstance(ids, torch.Tensor):
            self._shift_others(n)
            branch.pending += 1
        return call.result()

    def after(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        added, pending, real = self.calls.pop()
        self.branch.pending = min(self.branch.pending, pending)  # disarm if the embedding never ran
        if not self.branch.pending:
            self.branch.offset = 0
        return _strip(out, self.branch.length, real) if added and self.branch.strip else out


def _pad_encoder_mask(host: nn.Module, hook: InputHook) -> Callable:
    """A decoder pre-hook: widen `encoder_attention_mask` to the encoder output, which has the virtual tokens."""
    signature = inspect.signature(host.forward)

    def before(module: nn.Module, args: tuple, kwargs: dict):
        if not hook.running():
            return None
        call = _Call(signature, args, kwargs)
        mask, states = call.get("encoder_attention_mask"), call.get("encoder_hidden_states")
        if not isinstance(mask, torch.Tensor) or not isinstance(states, torch.Tensor) or mask.dim() != 2:
            return None
        missing = states.shape[1] - mask.shape[1]
        if missing <= 0:
            return None
        call.set("encoder_attention_mask", _ones_before(mask, missing, hook.branch.site))
        return call.result()

    return before


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def _install_hooks(model: nn.Module, branches: dict[str, Branch]) -> "RemoveHooks":
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False)) and hasattr(model, "get_encoder")
    stacks: dict[int, str] = {}
    handles = []
    try:
        for path, branch in branches.items():
            host, stack = model.get_submodule(path), model
            if encoder_decoder:
                stack = model.get_encoder()
                if not _contains(stack, host):
                    raise SurgeryError(f"prompt at site {path!r}: on an encoder-decoder model prompts go on the encoder "
                                       "input; this embedding is not the encoder's (exclude it in the rule)")
                if branch.strip:
                    raise SurgeryError(f"prompt at site {path!r}: strip is for decoder-only and encoder-only models "
                                       "(the decoder of an encoder-decoder attends to the virtual positions)")
            if id(stack) in stacks:
                raise SurgeryError(f"prompt sites {stacks[id(stack)]!r} and {path!r} feed the same model input; "
                                   "select one embedding.input site")
            stacks[id(stack)] = path
            hook = InputHook(branch, stack, labels=stack is model, model=model)
            handles.append(stack.register_forward_pre_hook(hook.before, with_kwargs=True))
            handles.append(stack.register_forward_hook(hook.after, with_kwargs=True, always_call=True))
            if encoder_decoder:
                decoder = model.get_decoder()
                handles.append(decoder.register_forward_pre_hook(_pad_encoder_mask(decoder, hook), with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise

    return RemoveHooks(handles, list(branches.values()))


class RemoveHooks:
    """Undo of a prompt attach: remove the hooks and disarm the branches. A plain object, not a closure, so it
    follows the model through `copy.deepcopy`."""

    def __init__(self, handles: list, branches: list[PromptBranch]):
        self.handles, self.branches = handles, branches

    def __call__(self) -> None:
        for handle in self.handles:
            handle.remove()
        for branch in self.branches:
            branch.pending = branch.offset = 0


def _embedding_sample(module: nn.Module, site: Site, ids: list[int] | None, count: int) -> torch.Tensor:
    """The embedding module's output for token ids (given, or `count` random ones), [len, dim], as float."""
    device = module_device(module)
    vocab = site.in_features or 1
    if ids is not None:
        bad = sorted({i for i in ids if not 0 <= i < vocab})
        if bad:
            raise SurgeryError(f"prompt at site {site.path!r}: init_ids {bad} are outside the vocabulary of {vocab}")
        tokens = torch.tensor(ids, device=device)
    else:
        tokens = torch.randint(0, vocab, (count,), device=device)
    with torch.no_grad():
        return module(tokens).detach().float()


def _initial(module: nn.Module, site: Site, n: int, init: str, ids: list[int] | None) -> torch.Tensor:
    if init == "ids":
        rows = _embedding_sample(module, site, [ids[i % len(ids)] for i in range(n)], n)
    elif init == "vocab":
        rows = _embedding_sample(module, site, None, n)
    else:
        scale = _embedding_sample(module, site, None, min(site.in_features or 1, 4096)).std()
        rows = torch.randn(n, site.out_features or 1, device=scale.device) * scale
    return rows


class PromptTuning(Method):
    name = "prompt-tuning"
    params = PromptParams
    kinds = frozenset({"embedding"})
    mergeable = False

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        prompt = _initial(module, site, params.num_virtual_tokens, params.init, params.init_ids)
        prompt = prompt.to(dtype=branch_dtype(params.dtype, first_float_dtype(module)), device=module_device(module))
        return PromptBranch(site.path, prompt, None, params.strip)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        return params.num_virtual_tokens * (site.out_features or 0)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None] | None:
        return _install_hooks(model, branches)


class PTuning(PromptTuning):
    name = "p-tuning"
    params = PTuningParams

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        dtype, device = branch_dtype(params.dtype, first_float_dtype(module)), module_device(module)
        inputs = _initial(module, site, params.num_virtual_tokens, "random", None).to(dtype=dtype, device=device)
        encoder = prompt_encoder(params.encoder, site.out_features, params.encoder_hidden, dtype, device)
        return PromptBranch(site.path, inputs, encoder, params.strip)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        encoder = prompt_encoder(params.encoder, site.out_features, params.encoder_hidden, torch.float32, "meta")
        return params.num_virtual_tokens * site.out_features + sum(p.numel() for p in encoder.parameters())


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [PromptTuning(), PTuning()]
