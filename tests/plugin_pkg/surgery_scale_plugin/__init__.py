"""A third-party surgery plugin: `out_scale` multiplies a linear's output channels by learned factors."""
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

import surgery


class OutScaleParams(surgery.MethodParams):
    init: float = Field(1.0, gt=0)


class OutScale(surgery.Branch):
    def __init__(self, features: int, init: float, dtype: torch.dtype):
        super().__init__()
        self.factor = nn.Parameter(torch.full((features,), init, dtype=dtype))

    def adapt_output(self, args, kwargs, out):
        return out * self.factor


class OutScaleMethod(surgery.Method):
    name = "out_scale"
    params = OutScaleParams
    kinds = frozenset({"linear"})
    mergeable = True

    def build(self, site, module, params, roles):
        return OutScale(site.out_features, params.init, module.weight.dtype)

    def count(self, site, params, roles):
        return site.out_features

    def merge_edit(self, site, module, branch):
        f = branch.factor.detach()
        return surgery.WeightEdit(apply=lambda w: w * f[:, None].to(w.dtype), revert=lambda w: w / f[:, None].to(w.dtype))


@surgery.hookimpl
def surgery_methods():
    return [OutScaleMethod()]


@surgery.hookimpl
def surgery_rule_dirs():
    return [Path(__file__).parent / "rules"]
