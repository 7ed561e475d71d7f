"""The CLI's MODEL argument: a local Hugging Face model directory or a built-in tiny model name. Never downloads."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from surgery import tiny
from surgery.errors import SurgeryError

TINY_PREFIX = "tiny-"

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer*.json", "tokenizer.model", "spiece.model", "sentencepiece*.model",
                                    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                                    "chat_template.*")
"""Files of a model directory that a merged copy of it carries over (the tokenizer and its chat template)."""


def tiny_names() -> list[str]:
    """The built-in tiny model names the CLI accepts: `tiny-<arch>` for every key of `tiny.ARCHITECTURES`."""
    return [TINY_PREFIX + arch for arch in tiny.ARCHITECTURES]


def tiny_arch(name: str) -> str | None:
    """The tiny architecture `name` (`tiny-gpt_neox` or `tiny-gpt-neox`) denotes, or None for any other name."""
    if not name.startswith(TINY_PREFIX):
        return None
    arch = name[len(TINY_PREFIX):].replace("-", "_")
    return arch if arch in tiny.ARCHITECTURES else None


def model_class(config) -> type[nn.Module]:
    """The transformers class a directory's config names in `architectures` (so the head is kept), else AutoModel."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def load_model(spec: str, weights: bool = True) -> nn.Module:
    """The model that `spec` names, in eval mode. A directory wins over a tiny name of the same spelling.

    With `weights=False` a directory's model is built on the meta device from its config alone (enough for
    `inspect` and `plan`, and instant for any size), unless the config declares quantization: quantized layers
    only exist once the checkpoint is loaded.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, weights)
    if path.exists():
        raise SurgeryError(f"{spec}: is a file; MODEL is a model directory or a tiny model name")
    arch = tiny_arch(spec)
    if arch is not None:
        return tiny.build(arch)
    hint = ("unknown tiny model" if spec.startswith(TINY_PREFIX)
            else "no such model directory, and not a tiny model name")
    raise SurgeryError(f"{spec}: {hint} (built in: {', '.join(tiny_names())})")


def _load_directory(path: Path, weights: bool) -> nn.Module:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise SurgeryError(f"{path}: no config.json, so not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise SurgeryError(f"{path / 'config.json'}: cannot read it: {err}") from None
    cls = model_class(config)
    if not weights and getattr(config, "quantization_config", None) is None:
        with torch.device("meta"):
            # `_from_config` is what the Auto classes' from_config calls (config dtype applied)
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        return model.eval()
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except OSError as err:
        raise SurgeryError(f"{path}: cannot load the model: {err}") from None
    return model.eval()


def copy_tokenizer(source: str, out: Path) -> list[str]:
    """Copy the tokenizer files of model directory `source` (if it is one) into `out`; returns their names."""
    src = Path(source).expanduser()
    if not src.is_dir():
        return []
    copied = []
    for pattern in TOKENIZER_FILES:
        for file in sorted(src.glob(pattern)):
            if file.is_file() and not (out / file.name).exists():
                shutil.copy2(file, out / file.name)
                copied.append(file.name)
    return copied


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' own tqdm bars (loading, writing shards) inside the CLI's progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
