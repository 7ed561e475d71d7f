"""Built-in weight formats for plain float layers: nn.Linear, transformers' Conv1D (GPT-2) and nn.Embedding.
Their dense [out, in] weight is a live view, so merges edit the stored weight in place."""
from __future__ import annotations

import torch
from torch import nn

import surgery


class _ViewFormat:
    is_view = True
    priority = 0

    def _weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": self._weight(module).clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self._weight(module).copy_(saved["weight"])

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.dense(module).copy_(weight)


class LinearFormat(_ViewFormat):
    """nn.Linear (and subclasses): weight [out, in]."""

    name, kind = "linear", "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.is_floating_point()

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dense(self, module: nn.Module) -> torch.Tensor:
        return self._weight(module)


class Conv1DFormat(_ViewFormat):
    """transformers' Conv1D (GPT-2 and relatives): weight stored transposed, [in, out]."""

    name, kind = "conv1d", "conv1d"

    def matches(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[0], module.weight.shape[1]

    def dense(self, module: nn.Module) -> torch.Tensor:
        return self._weight(module).T


class EmbeddingFormat(_ViewFormat):
    """nn.Embedding: weight [num_embeddings, dim], seen as a dense map from one-hot ids: [dim, num_embeddings]."""

    name, kind = "embedding", "embedding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def dense(self, module: nn.Module) -> torch.Tensor:
        return self._weight(module).T


@surgery.hookimpl
def surgery_weight_formats() -> list:
    return [LinearFormat(), Conv1DFormat(), EmbeddingFormat()]
