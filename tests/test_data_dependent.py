"""Data-dependent values in the analysis: sizes computed from the data (tokens routed to each expert, read with
`.tolist()`) in channel probes, and branches on the data (`if mask.any():`) in tracing."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from torch import nn

import zoo
from surgery import tiny
from surgery.analysis import probes
from surgery.analysis.facts import _CACHE, analyze
from surgery.errors import AnalysisWarning, TraceError


pytestmark = pytest.mark.usefixtures("fresh_analysis_cache")


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


class WeightBranch(nn.Module):
    """Branches on a value computed from a weight (as FastSpeech2 does on its predicted durations)."""

    def __init__(self, sign: float):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.local = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 16)
        with torch.no_grad():
            self.wide.weight.fill_(3.0 * sign)

    def forward(self, ids, mask):
        h = self.embed(ids)
        if (mask > 1).any() or (self.wide.weight > 2.5).all():
            return self.wide(h)
        return self.local(h)


@pytest.mark.parametrize("sign, taken", [(1.0, "wide"), (-1.0, "local")])
def test_a_branch_on_a_weight_is_taken_on_the_weight_s_real_value(sign, taken):
    """torch gives fake parameters uninitialized real tensors (its copy takes exact torch.Tensor only): the branch
    went by whatever memory held. Both ways here, so no fixed garbage can pass."""
    model = WeightBranch(sign).eval()
    ids = torch.arange(16).reshape(2, 8) % 32
    facts = analyze(model, (ids, torch.ones(2, 8, dtype=torch.long)))
    assert set(facts.linears) == {taken}


def test_fastspeech2_with_a_padded_mask_agrees_with_the_oracle():
    """FastSpeech2 branches on its predicted durations (`if duration_labels.sum() == 0`), computed from weights:
    on the real values, with a padded mask, the graph is the model's and its q/k/v readings the oracle's."""
    from transformers import FastSpeech2ConformerConfig, FastSpeech2ConformerModel

    sizes = {f"{part}_{what}": 1 if what == "layers" else 32 for part in ("duration_predictor", "energy_predictor",
                                                                         "pitch_predictor", "speech_decoder_postnet")
             for what in ("layers", "channels" if part != "speech_decoder_postnet" else "units")}
    config = FastSpeech2ConformerConfig(vocab_size=64, hidden_size=32, encoder_layers=1, decoder_layers=1,
                                        encoder_linear_units=32, decoder_linear_units=32, num_mel_bins=8,
                                        encoder_num_attention_heads=2, decoder_num_attention_heads=2, **sizes)
    torch.manual_seed(0)
    model = FastSpeech2ConformerModel(config).eval()
    ids = torch.arange(16).reshape(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    facts = analyze(model, (ids,), {"attention_mask": mask})
    seen = zoo.oracle(model, (ids,), {"attention_mask": mask})
    assert len(seen.calls) == len(facts.attention) == 2
    assert zoo.compare(facts, seen) == ("agree", "")


def test_eager_experts_are_traced_as_grouped_mm_and_put_back():
    """The OpenAI privacy filter runs its experts eagerly (a loop indexing by the experts the tokens reach, which
    export cannot follow even on real values): traced as grouped_mm, its readings agree with the oracle, and the
    model's own experts implementation is back afterwards."""
    model = zoo.build("openai_privacy_filter", attn="eager")
    if not hasattr(model, "get_experts_implementation"):
        pytest.skip(f"transformers {transformers.__version__} has no experts implementations to choose from")
    assert model.get_experts_implementation()[""] == "eager"
    facts = analyze(model)
    assert model.get_experts_implementation()[""] == "eager"
    attn = "layers.0.self_attn"
    assert facts.roles[f"{attn}.q_proj"] == {"attention.query"}
    assert any(path.startswith("layers.0.mlp.experts.") for path in facts.experts)
    [result] = zoo.check("openai_privacy_filter", variants=("eager",))
    assert (result.status, result.why) == ("agree", "")


class ConvertsItself(nn.Module):
    """Converts a submodule to the dtype it already has inside forward (SwitchTransformers' router)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.router = nn.Linear(16, 4)

    def forward(self, ids):
        self.router = self.router.to(torch.float32)
        return self.router(self.embed(ids))


def test_a_module_converted_to_its_own_dtype_in_forward_traces():
    """Under export the parameters are wrapper tensors, which Module._apply swaps, and a swap of a parameter
    with a weak reference fails ("Couldn't swap Linear.weight"): a `.to` that changes nothing keeps the module."""
    model = ConvertsItself().eval()
    to = nn.Module.to
    facts = analyze(model, (torch.arange(8).reshape(1, 8),))
    assert "router" in facts.linears
    assert nn.Module.to is to  # the plain `to` is back
    assert model.to(torch.float64).router.weight.dtype == torch.float64


def test_switch_transformers_is_a_clear_error():
    """SwitchTransformers picks each expert module by a value of the data (`self[f"expert_{idx[0]}"]` in a loop
    over the experts hit): export cannot follow it, on real values neither. The error names the model, both
    failures with the model's line, and what to do."""
    model = zoo.build("switch_transformers", attn="eager")
    with pytest.raises(TraceError, match=r"(?s)SwitchTransformersForConditionalGeneration.*data-dependent branch"
                                         r".*could not be taken on the inputs' real values either.*pass inputs.*"
                                         r"mixture-of-experts.*on the real values: \w+Error.*"
                                         r"modeling_switch_transformers\.py:\d+ in forward"):
        analyze(model)


@pytest.mark.parametrize("text, expected", [
    ("GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 1)", True),
    ("UserError: Could not extract specialized integer from data-dependent expression u0", True),
    ("RuntimeError: data dependent output size", True),
    ("TypeError: 'NoneType' object is not subscriptable", False),
])
def test_one_test_of_data_dependent_text(text, expected):
    """The exception's text, and the lines of a TraceError's list, are read by one helper."""
    from surgery.analysis.tracing import data_dependent, data_dependent_text

    assert data_dependent_text(text) is expected
    assert data_dependent(RuntimeError(text)) is expected


def test_udop_boxes_that_pick_image_patches_are_fixed_for_the_trace():
    """UDOP zips the patch indices its boxes' values pick into a tuple of tensors and indexes by it (reading fake
    tensors' data): the trace fixes the integer `bbox` (`fixed_inputs.value_inputs`), and every attention's q, k,
    v and output projections are read."""
    model = zoo.build("udop")
    facts = analyze(model)
    for attention in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.1.EncDecAttention"):
        for name, role in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "output")):
            assert facts.roles[f"{attention}.{name}"] == {f"attention.{role}"}


def test_encodec_paddings_from_scalar_buffers_are_fixed_for_the_trace():
    """Encodec computes each convolution's padding from its stride and kernel size, kept as 0-dim integer buffers
    (`if length <= max_pad:`); on real values its LSTM stops the trace. The trace fixes those buffers (copies of
    them, `fixed_inputs.scalar_buffers`): every convolution of the encoder and the decoder is in the graph, and the
    model's buffers are as they were."""
    from surgery.analysis.tracing import export_for_analysis

    model = zoo.build("encodec", attn="eager")
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    trace = export_for_analysis(model)
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv1d)}
    assert len(convs) > 4 and convs <= set(trace.module_paths.values())
    assert trace.on_values
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())


def test_a_model_returning_an_object_export_cannot_flatten_is_read_from_its_tensors():
    """A forward that returns a cache-like object beside its tensors (PI0.5 returns its DynamicCache whatever
    use_cache says): traced with only the output's tensors kept, its q/k/v read; its forward is its own after."""
    from surgery.analysis.facts import analyze

    class Cache:  # no pytree registration: export cannot flatten it
        pass

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q, k, v = (m(x).view(2, 4, 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 4, 16)
            return {"hidden": self.o(y), "cache": Cache()}

    model = Attention()
    facts = analyze(model, (torch.randn(2, 4, 16),), {})
    assert (facts.roles["q"], facts.roles["k"], facts.roles["v"], facts.roles["o"]) == (
        {"attention.query"}, {"attention.key"}, {"attention.value"}, {"attention.output"})
    assert "forward" not in vars(model)
    assert isinstance(model(torch.randn(2, 4, 16))["cache"], Cache)
