"""HF PEFT's LoRA adapter directories, both ways: `surgery.load` reads them, `surgery.save(..., format="peft")`
writes them (`peft.PeftModel.from_pretrained` loads the result with identical outputs).

Mapping: `target_modules` and the tensor keys give the sites; `r`, `lora_alpha`, `rank_pattern`,
`alpha_pattern`, `use_rslora`, `lora_dropout` the LoRA params; `fan_in_fan_out` is implied by the site kind
(GPT-2 Conv1D); `modules_to_save` become `copy` placements. A LoRA on the slices of a fused projection (e.g. q
and v of GPT-2's c_attn) is written exactly as one LoRA of rank n*r with a block-structured B. Anything else
PEFT can express (DoRA, LoRA bias, layer replication, ...) is refused by name.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import save as save_tensors
from torch import nn

import surgery
from surgery.plugin import (
    AdapterFileError,
    Attachment,
    MismatchError,
    Pattern,
    PatternError,
    RuleSet,
    SurgeryError,
    fill_branches,
    inspect,
    parse_ruleset,
    read_json,
    read_safetensors_header,
    read_tensors,
    write_directory,
)

CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT options this mapping cannot express, with the value that means "not used"
UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
               "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "arrow_config": None}

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<part>A|B)$")
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
MAX_PATTERNS = 10_000
"""Most keys a `rank_pattern` or `alpha_pattern` may have."""


class PeftLoraConfig(BaseModel):
    """The fields of a PEFT `adapter_config.json` that the mapping reads, validated strictly (no coercion, finite
    numbers). Other fields are allowed (and the unsupported ones refused by name, see UNSUPPORTED)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    peft_type: str
    r: int = Field(8, gt=0)
    lora_alpha: float = 8.0
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] | None = Field(default_factory=dict)
    alpha_pattern: dict[str, float] | None = Field(default_factory=dict)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict | None, info: Any) -> dict:
        value = value or {}
        if len(value) > MAX_PATTERNS:
            raise ValueError(f"more than {MAX_PATTERNS:,} keys")
        for key, number in value.items():
            if info.field_name == "rank_pattern" and number <= 0:
                raise ValueError(f"rank {number} for {key!r} is not positive")
            Pattern(key)  # refused now if it cannot be matched in linear time
        return value

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _targets(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str) and value != "all-linear":
            Pattern(value)
        return value


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path as a regex anchored at a dotted suffix
    (`re.match(rf"(.*\\.)?({key})$", path)`), matched here in linear time."""
    for key, value in patterns.items():
        pattern = Pattern(key)
        if pattern.literal is not None:
            if path == pattern.literal or path.endswith("." + pattern.literal):
                return value
        elif Pattern(rf"(?:.*\.)?(?:{key})").fullmatch(path):
            return value
    return default


def _matches_peft_target(path: str, targets: list[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _selected(path: str, targets: list[str] | str | None) -> bool:
    """Whether PEFT's `target_modules` (or `exclude_modules`) names module `path`: a list names modules or dotted
    suffixes, a string is a regex over the whole path."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return Pattern(targets).fullmatch(path)
    return _matches_peft_target(path, targets)


class PeftLoraFormat:
    """HF PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`)."""

    name = "peft"

    def detect(self, directory: Path) -> bool:
        return (directory / CONFIG).is_file()

    # ---- reading -------------------------------------------------------------------------------------------
    def _read_config(self, directory: Path) -> PeftLoraConfig:
        path = directory / CONFIG
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise AdapterFileError(f"{path}: not a JSON object")
        if raw.get("peft_type") != "LORA":
            raise AdapterFileError(f"{path}: peft_type {raw.get('peft_type')!r} cannot be mapped (only LORA adapters)")
        refused = [f"{k}={raw[k]!r}" for k, unused in UNSUPPORTED.items()
                   if raw.get(k, unused) not in (unused, None, [], {}, False) or
                   (k == "bias" and raw.get(k, unused) != unused)]
        if refused:
            raise AdapterFileError(f"{path}: PEFT options surgery cannot map: {', '.join(refused)}")
        try:
            return PeftLoraConfig.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(map(str, first["loc"]))
            raise AdapterFileError(f"{path}: field '{field}': {first['msg']} (got {first.get('input')!r:.80})") from None
        except PatternError as err:
            raise AdapterFileError(f"{path}: {err}") from None

    def load(self, model: nn.Module, directory: Path, name: str) -> Attachment:
        config = self._read_config(directory)
        tensor_path = directory / TENSORS
        if not tensor_path.exists() and (directory / "adapter_model.bin").exists():
            raise AdapterFileError(f"{directory / 'adapter_model.bin'}: pickle files are never loaded; convert it to safetensors")
        header = read_safetensors_header(tensor_path)
        keys = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): info for k, info in header.tensors.items()}
        report = inspect(model)
        sites = {s.path: s for s in report.sites if s.kind != "attention"}
        lora: dict[str, dict[str, Any]] = {}
        rest: dict[str, Any] = {}
        for key, info in keys.items():
            m = _LORA_KEY.match(key) or _EMBEDDING_KEY.match(key)
            if m:
                lora.setdefault(m["path"], {})[m["part"][-1]] = info
            else:
                rest[key] = info
        problems = [f"missing site {p!r} (LoRA in the adapter)" for p in lora if p not in sites]
        problems += [f"site {p!r}: LoRA A or B missing from {tensor_path}" for p, ab in lora.items() if set(ab) != {"A", "B"}]
        if config.fan_in_fan_out:
            problems += [f"site {p!r}: fan_in_fan_out is set but the module is not a transposed (Conv1D) layer"
                         for p in lora if p in sites and sites[p].kind != "conv1d"]
        problems += self._shape_problems(config, lora, sites)
        problems += self._target_problems(config, lora, sites)
        saved = config.modules_to_save or []
        copies = sorted({p for p in sites if _matches_peft_target(p, saved) and any(k.startswith(p + ".") for k in rest)})
        unclaimed = [k for k in rest if not any(k.startswith(p + ".") for p in copies)]
        problems += [f"tensor {PREFIX}{k!r} belongs to no LoRA site and no module in modules_to_save" for k in unclaimed]
        if problems:
            raise MismatchError(str(directory), problems)
        ruleset = self._ruleset(config, lora, copies, str(directory / CONFIG))
        plan = surgery.plan(model, ruleset)
        raw = read_tensors(tensor_path, max_bytes=8 * plan.trainable + (1 << 20))
        tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
        attachment = surgery.attach(model, ruleset, name=name)
        ours = {}
        for path in lora:
            ours[f"{path}.lora_A"], ours[f"{path}.lora_B"] = tensors[_key(tensors, path, "A")], tensors[_key(tensors, path, "B")]
        for path in copies:
            ours.update({f"{path}.module.{k[len(path) + 1:]}": v for k, v in tensors.items() if k.startswith(path + ".")})
        try:
            fill_branches(attachment, ours, str(tensor_path), strict_dtype=False)
        except BaseException:
            surgery.detach(model, name)
            raise
        return attachment

    def _shape_problems(self, config: PeftLoraConfig, lora: dict[str, dict[str, Any]], sites: dict) -> list[str]:
        """Each LoRA pair's shapes against its site and the rank the config gives it."""
        problems = []
        for path, ab in lora.items():
            if set(ab) != {"A", "B"} or path not in sites:
                continue
            a, b = ab["A"].shape, ab["B"].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                problems.append(f"site {path!r}: LoRA A {list(a)} and B {list(b)} are not a low-rank pair")
                continue
            if ab["A"].dtype not in _DTYPES or ab["B"].dtype not in _DTYPES:
                problems.append(f"site {path!r}: LoRA tensors of dtype {ab['A'].dtype}/{ab['B'].dtype} (float ones only)")
            expected = _pattern_value(config.rank_pattern, path, config.r)
            if a[0] != expected:
                problems.append(f"site {path!r}: LoRA of rank {a[0]} in the tensors, {expected} in {CONFIG} "
                                "(r / rank_pattern)")
        return problems

    def _target_problems(self, config: PeftLoraConfig, lora: dict[str, dict[str, Any]], sites: dict) -> list[str]:
        """`target_modules` (less `exclude_modules`) must name exactly the modules that have LoRA tensors."""
        targets = config.target_modules
        if targets is None or targets == "all-linear":
            return []

        def targeted(path: str) -> bool:
            return _selected(path, targets) and not _selected(path, config.exclude_modules)

        problems = [f"target_modules selects {p!r}, but {TENSORS} has no LoRA tensors for it"
                    for p in sorted(sites) if targeted(p) and p not in lora and sites[p].kind != "attention"
                    and not _matches_peft_target(p, config.modules_to_save or [])]
        problems += [f"{TENSORS} has LoRA tensors for {p!r}, which target_modules does not select"
                     for p in sorted(lora) if not targeted(p)]
        return problems

    def _ruleset(self, config: PeftLoraConfig, lora: dict[str, dict[str, Any]], copies: list[str],
                 source: str) -> RuleSet:
        groups: dict[tuple, list[str]] = {}
        for path, ab in sorted(lora.items()):
            r = ab["A"].shape[0]
            alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
            groups.setdefault((r, float(alpha), _DTYPES[ab["A"].dtype]), []).append(path)
        rules = [{"select": {"paths": [_glob_literal(p) for p in paths]}, "method": "lora",
                  "params": {"r": r, "alpha": alpha, "dropout": float(config.lora_dropout),
                             "rslora": config.use_rslora, "dtype": dtype}}
                 for (r, alpha, dtype), paths in groups.items()]
        if copies:
            rules.append({"select": {"paths": [_glob_literal(p) for p in copies]}, "method": "copy"})
        if not rules:
            raise AdapterFileError(f"{source}: the adapter holds no LoRA tensors")
        return parse_ruleset({"name": "peft-lora", "description": "an HF PEFT LoRA adapter", "rules": rules}, source)

    # ---- writing -------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, attachment: Attachment, directory: Path) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        copies: list[str] = []
        rslora = {p.params.rslora for p in attachment.plan.placements if p.method == "lora"}
        if len(rslora) > 1:
            raise SurgeryError("PEFT format: use_rslora is one flag for the whole adapter; this attachment mixes both")
        rs = rslora.pop() if rslora else False
        for placement in attachment.plan.placements:
            path, branch = placement.site.path, attachment.branches[placement.site.path]
            if placement.method == "copy":
                copies.append(path)
                tensors.update({f"{PREFIX}{path}.{k}": v for k, v in branch.module.state_dict().items()})
                continue
            if placement.method != "lora" or placement.site.kind == "quantized_linear":
                raise SurgeryError(f"PEFT format holds LoRA on float layers (and modules_to_save) only: "
                                   f"{placement.method} on {placement.site.kind} site {path!r} cannot be written")
            a, b, scale = _dense_lora(branch, placement.site.out_features)
            r = a.shape[0]
            ranks[path], alphas[path] = r, scale * (r ** 0.5 if rs else r)
            if placement.site.kind == "embedding":
                tensors[f"{PREFIX}{path}.lora_embedding_A"], tensors[f"{PREFIX}{path}.lora_embedding_B"] = a, b
            else:
                tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = a, b
        if not ranks:
            raise SurgeryError("PEFT format: the attachment has no LoRA placement")
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        first = next(p for p in attachment.plan.placements if p.method == "lora")
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "r": r, "lora_alpha": alpha, "lora_dropout": first.params.dropout, "use_rslora": rs,
            "target_modules": sorted(ranks), "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
            "fan_in_fan_out": all(p.site.kind == "conv1d" for p in attachment.plan.placements if p.method == "lora"),
            "bias": "none", "modules_to_save": copies or None, "init_lora_weights": True, "inference_mode": True,
        }
        blob = save_tensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata={"format": "pt"})
        return write_directory(directory, {TENSORS: blob, CONFIG: (json.dumps(config, indent=2) + "\n").encode()})


def _glob_literal(path: str) -> str:
    """A glob that matches exactly `path` (module paths may hold glob characters)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


def _key(tensors: dict[str, torch.Tensor], path: str, part: str) -> str:
    linear, embedding = f"{path}.lora_{part}.weight", f"{path}.lora_embedding_{part}"
    return linear if linear in tensors else embedding


def _dense_lora(branch: nn.Module, out_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one plain LoRA equal to the branch. Per-role parts on a fused projection become one
    LoRA of the summed rank whose B holds each part's B on that part's rows and rank columns (exact)."""
    parts = list(branch.parts.values()) if hasattr(branch, "parts") else [branch]
    if len(parts) == 1 and getattr(parts[0], "channels", None) is None:
        return parts[0].lora_A.detach(), parts[0].lora_B.detach(), parts[0].scale
    scales = {p.scale for p in parts}
    if len(scales) != 1:
        raise SurgeryError("PEFT format: the parts of a fused-projection LoRA have different scales")
    a = torch.cat([p.lora_A.detach() for p in parts])
    b = torch.zeros(out_features, a.shape[0], dtype=a.dtype, device=a.device)
    column = 0
    for p in parts:
        r = p.lora_A.shape[0]
        b[p.channels, column:column + r] = p.lora_B.detach()
        column += r
    return a, b, scales.pop()


@surgery.hookimpl
def surgery_adapter_formats() -> list[PeftLoraFormat]:
    return [PeftLoraFormat()]
