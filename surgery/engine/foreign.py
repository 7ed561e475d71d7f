"""Models that another PEFT library has already changed: refused by `attach` with the way out."""
from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError


def _from_peft(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "peft"


def refuse_peft(model: nn.Module) -> None:
    """Raise a SurgeryError if `model` is an HF `peft` model (PeftModel, PeftMixedModel) or holds `peft` layers."""
    if _from_peft(type(model)):
        raise SurgeryError(
            f"attach got an HF PEFT {type(model).__name__}, not the model itself. To use its adapter with surgery, "
            "load it onto the plain base model: surgery.load(base_model, peft_adapter_dir). To adapt the model "
            "instead, unwrap it first: peft_model.unload() gives the base model without PEFT's layers, "
            "peft_model.merge_and_unload() with PEFT's adapter baked in (peft_model.get_base_model() still holds "
            "PEFT's layers)")
    layer = next((path for path, m in model.named_modules() if _from_peft(type(m))), None)
    if layer is not None:
        raise SurgeryError(
            f"attach: module {layer!r} is an HF PEFT layer ({type(model.get_submodule(layer)).__name__}): this model "
            "was changed by peft. Remove PEFT's layers first (peft_model.unload(), or merge_and_unload() to keep the "
            "adapter baked in), or load a PEFT adapter with surgery.load(base_model, peft_adapter_dir)")
