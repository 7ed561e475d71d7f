"""Data-dependent values in the analysis: sizes computed from the data (tokens routed to each expert, read with
`.tolist()`) in channel probes, and branches on the data (`if mask.any():`) in tracing."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

from surgery import tiny  # noqa: E402
from surgery.analysis import probes  # noqa: E402
from surgery.analysis.facts import _CACHE, analyze  # noqa: E402
from surgery.errors import AnalysisWarning, TraceError  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_cache():
    _CACHE.clear()
    yield
    _CACHE.clear()


def test_probe_through_expert_sizes_read_from_the_data():
    """JetMoE splits the routed tokens by per-expert counts read with `.tolist()` (unbacked sizes): the probe
    computes the counts from the router's (random) logits, so the split adds up, and reads the fused gate/up
    halves of the stacked experts and kv_proj's key/value halves."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2)
    model = JetMoeForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnalysisWarning)
        facts = analyze(model)
    mlp, attn = "model.layers.0.mlp", "model.layers.0.self_attention"
    assert facts.roles[f"{mlp}.input_linear.weight"] == {"mlp.gate", "mlp.up"}
    assert facts.slices[f"{mlp}.input_linear.weight"] == {"mlp.gate": ((0, 96),), "mlp.up": ((96, 192),)}
    assert facts.roles[f"{mlp}.output_linear.weight"] == {"mlp.down"}
    width = facts.linears[f"{attn}.kv_proj"].out_features
    assert facts.slices[f"{attn}.kv_proj"] == {"attention.key": ((0, width // 2),),
                                               "attention.value": ((width // 2, width),)}


def test_a_probe_that_cannot_run_says_what_it_could_not_read(monkeypatch):
    """A region the probe cannot run leaves the roles the graph walk reads, and a warning names the module."""
    model = tiny.build("gpt2")
    whole = analyze(model)

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot run here")

    _CACHE.clear()
    monkeypatch.setattr(probes, "run_region", refuse)
    with pytest.warns(AnalysisWarning) as caught:
        facts = analyze(model)
    said = [str(w.message) for w in caught]
    assert any(re.search(r"of transformer\.h\.0\.attn\.c_attn reach (attention\.(key|query|value)(, )?){3} "
                         r"\(RuntimeError: cannot run here\).*without exact channel slices", m) for m in said), said
    assert any("of transformer.h.0.mlp.c_fc reach mlp.gate, mlp.down" in m for m in said), said
    c_attn = "transformer.h.0.attn.c_attn"
    assert whole.slices[c_attn] and c_attn not in facts.slices
    assert facts.roles[c_attn] == whole.roles[c_attn]


class Branchy(nn.Module):
    """Branches on a value of its input, as LED's encoder does on whether any token has global attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.local = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids, mask):
        h = self.embed(ids)
        if (mask > 1).any():
            return self.wide(h)
        return self.local(h)


def test_a_branch_on_the_data_is_traced_as_the_inputs_take_it():
    model = Branchy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(16).reshape(2, 8) % 32
    plain = analyze(model, (ids, torch.ones(2, 8, dtype=torch.long)))
    wide = analyze(model, (ids, torch.full((2, 8), 2)))
    assert set(plain.linears) == {"local"} and set(wide.linears) == {"wide"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_branch_on_the_data_of_a_meta_model_is_a_clear_error():
    model = Branchy().to("meta")
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(TraceError, match=r"(?s)Branchy.*data-dependent branch.*meta device.*load real weights"):
        analyze(model, (ids, ids))


def test_led_traces_on_real_values():
    """LED (`is_global_attn = mask.any().item()`, then `if is_global_attn:`) traces with surgery's own inputs: no
    global attention, the local path."""
    facts = analyze(zoo.build("led"))
    layer = "led.decoder.layers.0"
    assert facts.roles[f"{layer}.self_attn.q_proj"] == {"attention.query"}
    assert facts.roles[f"{layer}.encoder_attn.k_proj"] == {"attention.key"}
    assert facts.attention[f"{layer}.encoder_attn"].cross


def test_led_on_the_meta_device_is_a_clear_error():
    """On the meta device there are no real values to take the branch on: the error names the model, the line
    that branched and what to do."""
    with pytest.raises(TraceError, match=r"(?s)LEDForConditionalGeneration.*data-dependent branch.*meta device.*"
                                         r"modeling_led\.py:\d+ in forward"):
        analyze(zoo.build("led").to("meta"))
