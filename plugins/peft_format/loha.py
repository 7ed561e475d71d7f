"""PEFT type LOHA <-> method `loha`: the four factors per nn.Linear under PEFT's names, `r` (and `rank_pattern`)
from their shapes, `alpha`/`alpha_pattern`, `rank_dropout`, `module_dropout`. Layer selection
(`layers_to_transform`, `layers_pattern`) is refused by name; convolution factors (`hada_t1`, `hada_t2`) find no
site."""
from __future__ import annotations

from typing import Any

from surgery_plugins.peft_format.common import FactorMapping, dtype_name, one_value, pattern_value, rank_alpha_fields

UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None}


class LohaMapping(FactorMapping):
    peft_type = "LOHA"
    methods = frozenset({"loha"})
    method, what = "loha", "LoHa"
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    unsupported = UNSUPPORTED

    def site_params(self, config: dict[str, Any], path: str, found: dict) -> dict[str, Any]:
        return {"r": int(found["hada_w1_a"].shape[1]),
                "alpha": float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("alpha", 8))),
                "rank_dropout": float(config.get("rank_dropout") or 0.0),
                "module_dropout": float(config.get("module_dropout") or 0.0), "dtype": dtype_name(found["hada_w1_a"])}

    def config_fields(self, placements: list[Any], attachment: Any) -> dict[str, Any]:
        return {**rank_alpha_fields(placements),
                "rank_dropout": one_value(placements, "rank_dropout"),
                "module_dropout": one_value(placements, "module_dropout"),
                "init_weights": True, "use_effective_conv2d": False}
