"""Contributes the built-in rule files (`rules/` in the source tree) to the rule-set search path."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import surgery


@surgery.hookimpl
def surgery_rule_dirs() -> list[Path]:
    return [Path(str(files("surgery_rules")))]
