"""A LoRA output's base matmul and update in either order (plugins/lora/update_first.py): both orders against the
float64 formula, the order chosen by shape, and a routed batch in inference with every site taking the update
first, against each sample alone."""
import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery_plugins.lora import update_first
from tests.test_routed_group import model_with_jobs


@pytest.fixture
def first_everywhere(monkeypatch):
    """Every shape takes the update first; returns the shapes ([tokens, out]) that did."""
    taken = []
    monkeypatch.setattr(update_first, "FIRST_OUT", 0)
    monkeypatch.setattr(update_first, "FIRST_ELEMENTS", 0)
    real = update_first.update_first
    monkeypatch.setattr(update_first, "update_first",
                        lambda tokens, out: real(tokens, out) and (taken.append((tokens, out)) or True))
    return taken


def test_the_order_follows_the_measured_shapes():
    assert update_first.update_first(16384, 2048) and update_first.update_first(4096, 14336)
    assert not update_first.update_first(16384, 512)  # a narrow output (GQA k/v): the update after
    assert not update_first.update_first(4096, 4096) and not update_first.update_first(32, 2048)  # few tokens


@pytest.mark.parametrize("order", ["after", "first"])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("s", [1.0, 0.5])
def test_either_order_equals_the_formula(monkeypatch, order, has_bias, s):
    if order == "first":
        monkeypatch.setattr(update_first, "FIRST_OUT", 0)
        monkeypatch.setattr(update_first, "FIRST_ELEMENTS", 0)
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*size, generator=g, dtype=torch.float64) for size in ((9, 16), (12, 16), (12, 4)))
    hs = torch.randn(9, 10, generator=g, dtype=torch.float64)
    h = hs[:, 3:7]  # a column slice of a joined h
    bias = torch.randn(12, generator=g, dtype=torch.float64) if has_bias else None
    assert update_first.update_first(9, 12) == (order == "first")
    got = update_first.linear(x, w, bias, h, b, s)
    torch.testing.assert_close(got, F.linear(x, w, bias) + s * h @ b.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [True, False])
def test_routed_inference_with_the_update_first_equals_each_sample_alone(first_everywhere, monkeypatch, grouped):
    from surgery_plugins.lora import routed_group

    if grouped:
        monkeypatch.setattr(routed_group, "INFERENCE_ELEMENTS", 1)
    model = model_with_jobs("qwen2").eval()  # q/k/v with biases
    names = ["a", None, "c", "b"]
    ids = torch.randint(1, 100, (len(names), 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with surgery.per_sample(model, names):
            got = model(input_ids=ids, use_cache=False).logits
        assert first_everywhere, "no routed site took the update first"
        monkeypatch.setattr(update_first, "FIRST_OUT", 1 << 40)  # each sample alone: the update after the base
        for i, name in enumerate(names):
            surgery.set_active(model, [name] if name else [])
            alone = model(input_ids=ids[i:i + 1], use_cache=False).logits
            torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-10, atol=1e-12)
