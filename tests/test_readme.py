"""The README's "Coming from HF PEFT" table names only things that exist, on both sides."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import surgery
from surgery import tiny

README = Path(__file__).resolve().parent.parent / "README.md"


def _migration_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Coming from HF PEFT"):]
    section = section[:section.index("\n## ", 3)]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return [(peft_side.strip("| "), ours.strip("| ")) for peft_side, ours in rows]


def test_every_surgery_name_in_the_migration_table_exists():
    names = {n for _, ours in _migration_rows() for n in re.findall(r"surgery\.(\w+)\(", ours)}
    assert {"attach", "trainable_parameters", "bake", "load", "per_sample", "save"} <= names
    assert not [n for n in names if not callable(getattr(surgery, n, None))]


def test_every_peft_name_in_the_migration_table_exists():
    peft = pytest.importorskip("peft")
    rows = _migration_rows()
    calls = {n for peft_side, _ in rows for n in re.findall(r"model\.(\w+)\(", peft_side)}
    assert {"print_trainable_parameters", "merge_and_unload", "set_adapter"} <= calls
    model = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert not [n for n in calls if not callable(getattr(model, n, None))]
    assert callable(peft.PeftModel.from_pretrained)
    keywords = {k for peft_side, _ in rows for k in re.findall(r"(\w+)=", peft_side)}
    assert {"target_modules", "modules_to_save", "r", "lora_alpha"} <= keywords - {"adapter_names", "combination_type"}
    assert not keywords - {"adapter_names", "combination_type"} - set(peft.LoraConfig.__dataclass_fields__)
