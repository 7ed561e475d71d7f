"""What the PEFT mappings share: PEFT's key prefix, option refusal, target and pattern lookup, tensor grouping."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from surgery.plugin import AdapterFileError

PREFIX = "base_model.model."
"""What PEFT puts before a module path in its tensor keys."""
CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"


def refuse(config: dict[str, Any], unsupported: dict[str, Any], source: str) -> None:
    """Refuse, by name, the options of `unsupported` (name -> the value that means "not used") that `config` sets;
    `source` is the adapter directory. Empty values (None, [], {}, False) count as unused, except for options whose
    unused value is a string."""
    refused = [f"{k}={config[k]!r}" for k, unused in unsupported.items()
               if config.get(k, unused) not in (unused, None, [], {}, False)
               or (isinstance(unused, str) and config.get(k, unused) != unused)]
    if refused:
        raise AdapterFileError(f"{source}/{CONFIG}: PEFT options surgery cannot map: {', '.join(refused)}")


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path as a regex anchored at a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def matches_target(path: str, targets: list[str]) -> bool:
    """PEFT's list form of `target_modules`: the path itself or a dotted suffix of it."""
    return any(path == t or path.endswith("." + t) for t in targets)


def unprefixed(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def most_common(values: dict[str, Any]) -> Any:
    """The value most sites have (PEFT's default, the others go into a pattern)."""
    return Counter(values.values()).most_common(1)[0][0]


def pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """`rank_pattern`/`alpha_pattern` for the sites whose value is not the default, keyed by exact path."""
    return {re.escape(p): v for p, v in values.items() if v != default}
