"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation") for surgery, as HF PEFT implements it:
frozen random projections A [r, in] and B [out, r], shared by every adapted layer of an attachment, and two trained
scaling vectors per layer,

    y = W x + b + Λ_b B Λ_d A x,     Λ_b = diag(vera_lambda_b) [out],  Λ_d = diag(vera_lambda_d) [r].

A and B are drawn once per attachment for the largest input and output widths of its sites (kaiming-uniform from
a CPU generator seeded with `projection_prng_key`, as PEFT draws them); a layer uses the slices A[:, :in] and
B[:out]. The first site's branch holds them (`vera_A`, `vera_B`, saved with the adapter); the others read them
there. Λ_b starts at zero and Λ_d at `d_initial`, so the model starts unchanged. On a fused projection selected by
role, Λ_b covers the selected channels and B's rows of those channels. Merging adds ΔW = Λ_b B Λ_d A.

This package is the worked example of a method plugin shipped on its own: it imports only `surgery` and
`surgery.plugin`, registers through the `surgery` entry-point group, ships its rule file as package data
(`surgery_rule_dirs`) and maps PEFT's VERA adapters (`surgery_peft_mappings`, in `surgery_vera.peft`).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import surgery
from surgery.plugin import Method, PeftMapping
from surgery_vera.method import Vera, VeraBranch, VeraParams, projections, vera_delta
from surgery_vera.peft import VeraMapping

__all__ = ["Vera", "VeraBranch", "VeraParams", "VeraMapping", "projections", "vera_delta"]


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Vera()]


@surgery.hookimpl
def surgery_rule_dirs() -> list[Path]:
    """The rule files shipped in this package (`rules/*.yaml`, package data)."""
    return [Path(str(files("surgery_vera") / "rules"))]


@surgery.hookimpl
def surgery_peft_mappings() -> list[PeftMapping]:
    return [VeraMapping()]
