"""The protocol of adapter file formats that plugins provide (`surgery_adapter_formats`), e.g. HF PEFT's."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from surgery.ledger import Attachment


@runtime_checkable
class AdapterFormat(Protocol):
    name: str

    def detect(self, directory: Path) -> bool: ...
    def load(self, model: nn.Module, directory: Path, name: str) -> "Attachment": ...
    def save(self, model: nn.Module, attachment: "Attachment", directory: Path) -> Path: ...
