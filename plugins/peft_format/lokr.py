"""PEFT type LOKR <-> method `lokr`: the factors per nn.Linear under PEFT's names (whole or low-rank, as `r`,
`decompose_both` and `decompose_factor` decide), `r`/`rank_pattern`, `alpha`/`alpha_pattern`, `rank_dropout`,
`rank_dropout_scale`, `module_dropout`. Layer selection (`layers_to_transform`, `layers_pattern`) is refused by
name; the convolution core (`lokr_t2`) finds no site."""
from __future__ import annotations

from typing import Any

from surgery_plugins.peft_format.common import FactorMapping, dtype_name, one_value, pattern_value, rank_alpha_fields

UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None}


class LokrMapping(FactorMapping):
    peft_type = "LOKR"
    methods = frozenset({"lokr"})
    method, what = "lokr", "LoKr"
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    unsupported = UNSUPPORTED

    def site_params(self, config: dict[str, Any], path: str, found: dict) -> dict[str, Any]:
        return {"r": int(pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))),
                "alpha": float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("alpha", 8))),
                "rank_dropout": float(config.get("rank_dropout") or 0.0),
                "module_dropout": float(config.get("module_dropout") or 0.0),
                "rank_dropout_scale": bool(config.get("rank_dropout_scale")),
                "decompose_both": bool(config.get("decompose_both")),
                "decompose_factor": int(config.get("decompose_factor", -1)),
                "dtype": dtype_name(next(iter(found.values())))}

    def config_fields(self, placements: list[Any], attachment: Any) -> dict[str, Any]:
        return {**rank_alpha_fields(placements),
                "rank_dropout": one_value(placements, "rank_dropout"),
                "module_dropout": one_value(placements, "module_dropout"),
                "rank_dropout_scale": one_value(placements, "rank_dropout_scale"),
                "decompose_both": one_value(placements, "decompose_both"),
                "decompose_factor": one_value(placements, "decompose_factor"),
                "init_weights": True, "use_effective_conv2d": False}
