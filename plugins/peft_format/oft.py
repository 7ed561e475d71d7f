"""PEFT type OFT <-> method `oft`: `oft_R.weight` per nn.Linear (blocks and block size from its shape),
`use_cayley_neumann`, `num_cayley_neumann_terms`, `coft`, `eps`, `block_share`, `module_dropout`. OFT adapters of
PEFT < 0.14 (another parameterisation, no `oft_block_size`) are refused, as PEFT refuses them; an OFT bias and layer
selection are refused by name. PEFT holds one `oft_block_size` (or one `r`) for all layers."""
from __future__ import annotations

import math
import warnings
from typing import Any

from surgery.plugin import AdapterFileError, SurgeryError
from surgery_plugins.peft_format.common import CONFIG, FactorMapping, dtype_name, one_value

UNSUPPORTED = {"bias": "none", "layers_to_transform": None, "layers_pattern": None}
NEUMANN_SINCE = "0.18.0"
"""The PEFT version whose Cayley-Neumann series `oft` computes (PEFT changed it then, and warns on older files);
written as `peft_version` so that PEFT reads the file with that series."""


def _older(version: str | None, than: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else 0 for p in v.partition("@")[0].split(".")[:3])
    return version is None or parts(version) < parts(than)


class OftMapping(FactorMapping):
    peft_type = "OFT"
    methods = frozenset({"oft"})
    method, what = "oft", "OFT"
    names = ("oft_R.weight",)
    renames = {"oft_R.weight": "oft_R"}
    unsupported = UNSUPPORTED

    def check(self, config: dict[str, Any], source: str) -> None:
        if "oft_block_size" not in config:
            raise AdapterFileError(f"{source}/{CONFIG}: an OFT adapter of PEFT < 0.14 (no oft_block_size), whose "
                                   "rotation is parameterised differently; PEFT does not load it either")
        if config.get("use_cayley_neumann", True) and _older(config.get("peft_version"), NEUMANN_SINCE):
            warnings.warn(f"{source}: OFT adapter of PEFT {config.get('peft_version') or '< 0.18'}, whose Cayley-Neumann "
                          f"series PEFT {NEUMANN_SINCE} changed; it is read with the new one, as PEFT does", stacklevel=2)

    def site_params(self, config: dict[str, Any], path: str, found: dict) -> dict[str, Any]:
        weight = found["oft_R.weight"]
        size = int(round((1 + math.sqrt(1 + 8 * weight.shape[1])) / 2))
        return {"block_size": size, "r": 0, "block_share": bool(config.get("block_share")),
                "use_cayley_neumann": bool(config.get("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": int(config.get("num_cayley_neumann_terms", 5)),
                "coft": bool(config.get("coft")), "eps": float(config.get("eps", 6e-5)),
                "module_dropout": float(config.get("module_dropout") or 0.0), "dtype": dtype_name(weight)}

    def config_fields(self, placements: list[Any], attachment: Any) -> dict[str, Any]:
        branches = [attachment.branches[p.site.path] for p in placements]
        sizes, blocks = {b.block_size for b in branches}, {b.blocks for b in branches}
        if len(sizes) == 1:
            block_size, r = sizes.pop(), 0
        elif len(blocks) == 1:
            block_size, r = 0, blocks.pop()
        else:
            raise SurgeryError(f"PEFT format: PEFT's OFT has one block size (or one block count) for all layers; this "
                               f"attachment has block sizes {sorted(sizes)} and counts {sorted(blocks)}")
        neumann = one_value(placements, "use_cayley_neumann")
        fields = {"oft_block_size": block_size, "r": r, "use_cayley_neumann": neumann,
                  "num_cayley_neumann_terms": one_value(placements, "num_cayley_neumann_terms"),
                  "coft": one_value(placements, "coft"), "eps": one_value(placements, "eps"),
                  "block_share": one_value(placements, "block_share"),
                  "module_dropout": one_value(placements, "module_dropout"),
                  "target_modules": sorted(p.site.path for p in placements), "init_weights": True, "bias": "none",
                  "fan_in_fan_out": False}
        if neumann:
            fields["peft_version"] = NEUMANN_SINCE
        return fields
