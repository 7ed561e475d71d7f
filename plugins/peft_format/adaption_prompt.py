"""PEFT type ADAPTION_PROMPT <-> method `llama-adapter`: `adaption_prompt` and `adaption_gate` per attention module,
`adapter_len`, `adapter_layers` (the top L attention modules named `target_modules`). PEFT adds the prompt attention
before the output projection on Llama and Mistral and after it, unprojected, on GPT-2: `output_projection` follows
the model. PEFT has the type for model types llama, mistral and gpt2 only."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.plugin import MismatchError, SurgeryError
from surgery_plugins.peft_format.common import PREFIX, by_site, dtype_name, one_value

MODEL_TYPES = ("llama", "mistral", "gpt2")
"""The model types PEFT's adaption prompt supports."""
NAMES = ("adaption_prompt", "adaption_gate")


def _unprojected(module_class: str) -> bool:
    """PEFT adds the prompt attention after the output projection on GPT-2 (its `AdaptedAttentionGPT`)."""
    return module_class.startswith("transformers.models.gpt2.")


class AdaptionPromptMapping:
    peft_type = "ADAPTION_PROMPT"
    methods = frozenset({"llama-adapter"})

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: Any,
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        sites = {s.path: s for s in report.sites if s.kind == "attention"}
        found, rest = by_site(tensors, NAMES)
        problems = [f"missing attention site {p!r} (adaption prompt in the adapter)" for p in found if p not in sites]
        problems += [f"site {p!r}: {', '.join(n for n in NAMES if n not in parts)} missing" for p, parts in found.items()
                     if set(parts) != set(NAMES)]
        problems += [f"tensor {k!r} belongs to no adapted attention and no module in modules_to_save" for k in rest]
        if found and config.get("adapter_layers") not in (None, len(found)):
            problems.append(f"adapter_layers is {config['adapter_layers']}, the file holds prompts for {len(found)} layers")
        if problems:
            raise MismatchError(source, problems)
        rules = []
        for path, parts in sorted(found.items()):
            prompt = parts["adaption_prompt"]
            rules.append({"select": {"paths": [path]}, "method": "llama-adapter",
                          "params": {"adapter_len": int(prompt.shape[1]), "dtype": dtype_name(prompt),
                                     "output_projection": not _unprojected(sites[path].module_class)}})
        ours = {f"{path}.{name}": t for path, parts in found.items() for name, t in parts.items()}
        return rules, ours

    def write(self, model: nn.Module, attachment: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        placements = [p for p in attachment.plan.placements if p.method in self.methods]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MODEL_TYPES:
            raise SurgeryError(f"PEFT format: PEFT's adaption prompt supports model types {', '.join(MODEL_TYPES)}; "
                               f"this model is {model_type!r}")
        unprojected = model_type == "gpt2"
        for p in placements:
            if p.params.output_projection == unprojected:
                raise SurgeryError(f"PEFT format: PEFT's adaption prompt on {model_type} adds the prompt attention "
                                   f"{'after the output projection, unprojected' if unprojected else 'before the output projection'}; "
                                   f"{p.site.path!r} has output_projection: {p.params.output_projection}")
        names = {p.site.path.rsplit(".", 1)[-1] for p in placements}
        paths = [p.site.path for p in placements]
        everywhere = [n for n, _ in model.named_modules() if n.endswith(f".{next(iter(names))}")]  # as PEFT finds them
        if len(names) != 1 or everywhere[-len(paths):] != paths:
            raise SurgeryError(f"PEFT format: PEFT's adaption prompt adapts the top adapter_layers modules of one name; "
                               f"this attachment adapts {', '.join(paths)}")
        tensors = {f"{PREFIX}{path}.{name}": getattr(attachment.branches[path], name).detach()
                   for path in paths for name in NAMES}
        fields = {"adapter_len": one_value(placements, "adapter_len"), "adapter_layers": len(paths),
                  "target_modules": names.pop(),
                  "task_type": "CAUSAL_LM" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None}
        return fields, tensors
