"""The model card (`README.md`) written beside a saved adapter, as HF PEFT does: method, rule set, base model,
versions and trainable parameter count. A README.md that surgery did not write (no marker line) is kept."""
from __future__ import annotations

import json
import os
import stat
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from surgery.core.method import base_parameter_count
from surgery.core.version import __version__
from surgery.engine.ledger import Attachment

CARD = "README.md"
MARK = "# model card written by surgery.save (delete this line to keep your edits when saving again)"


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def ours(path: Path) -> bool:
    """Whether the README.md at `path` is missing or was written by surgery (its front matter holds the mark).
    Only its first bytes are read, and only from a regular file: a symlink, FIFO or device there is not ours."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, 4096).decode("utf-8", errors="replace").splitlines()[:3]
    except OSError:
        return False
    finally:
        os.close(fd)
    return MARK in head


def card_text(model: nn.Module, attachment: Attachment, format: str) -> str:
    """The card's Markdown (with Hugging Face front matter) for `attachment` of `model`, saved in `format`."""
    config = getattr(model, "config", None)
    base = getattr(config, "_name_or_path", None) or None
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    methods = Counter(p.method for p in attachment.plan.placements)
    params = {id(p): p.numel() for b in attachment.branches.values() for p in b.parameters()}
    trainable, total = sum(params.values()), base_parameter_count(model)
    ruleset = attachment.plan.ruleset
    front = ["---", MARK, f"library_name: {'peft' if format == 'peft' else 'surgery'}"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front += ["tags:", "- surgery", *(f"- {json.dumps(m)}" for m in methods), "---", ""]
    rows = [
        ("adapter", f"`{attachment.name}`, {format} format"),
        ("method", ", ".join(f"{m} ({n} site{'s' * (n != 1)})" for m, n in methods.items())),
        ("rule set", f"`{ruleset.name}`" + (f": {ruleset.description}" if ruleset.description else "")),
        ("base model", (f"`{base}`, " if base else "") + f"`{model_class}`"),
        ("trainable parameters", f"{trainable:,} ({100.0 * trainable / max(total, 1):.2f}% of the base model's {total:,})"),
        ("versions", f"surgery {__version__}, torch {torch.__version__}, transformers {installed_version('transformers')}"
                     + (f", peft {installed_version('peft')}" if format == "peft" else "")),
    ]
    load = [f"model = {type(model).__name__}.from_pretrained({json.dumps(base or 'path/to/the/base/model')})",
            "surgery.load(model, \"path/to/this/directory\")"]
    if format == "peft":
        load.append("# or with HF PEFT: peft.PeftModel.from_pretrained(model, \"path/to/this/directory\")")
    body = [f"# {attachment.name}: a {', '.join(methods)} adapter for {type(model).__name__}", "",
            "| | |", "|---|---|", *(f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in rows), "", "## Loading it", "", "```python",
            "import surgery", *load, "```", ""]
    return "\n".join(front + body)


def with_model_card(files: dict[str, bytes], model: nn.Module, attachment: Attachment, directory: str | Path,
                    format: str) -> dict[str, bytes]:
    """`files` (about to be written together into `directory`) plus the model card, unless `directory` holds a
    README.md that surgery did not write."""
    if not ours(Path(directory) / CARD):
        return files
    return {**files, CARD: card_text(model, attachment, format).encode()}
