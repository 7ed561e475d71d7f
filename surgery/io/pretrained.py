"""Adapters beside a model saved with `save_pretrained` while attached: each attachment, in surgery's format, in
`<directory>/adapters/<name>/` (see `surgery.engine.plain_save`). The `surgery` package registers it on import."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from surgery.engine.plain_save import COMPANIONS
from surgery.io.adapter_files import save


def write_adapter(model: nn.Module, name: str, directory: Path) -> None:
    save(model, directory, name=name)


def register() -> None:
    """Have `save_pretrained` of an adapted model write its attachments beside it (once)."""
    if write_adapter not in COMPANIONS:
        COMPANIONS.append(write_adapter)
