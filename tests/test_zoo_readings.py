"""Readings the zoo's gradient oracle found wrong or incomplete, each against the oracle (tests/zoo.py): query
experts (JetMoE), keys pooled over windows (DeepSeek V4), and the oracle's own view of projections by parameters
(XLNet's einsum, WavLM's F.multi_head_attention_forward)."""
from __future__ import annotations

import pytest
import torch

import zoo
from surgery.analysis.facts import analyze


pytestmark = pytest.mark.usefixtures("fresh_analysis_cache")


def test_jetmoe_query_experts_are_the_query_projection():
    """JetMoE's mixture of attention heads computes the query with stacked expert weights (F.linear on
    `weight[i]`, the routed outputs put back in order with index_add): that parameter is the query projection,
    as the oracle (cutting products by 3-D parameters) sees it."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = JetMoeForCausalLM(config).eval()
    facts = analyze(model)
    attn = "model.layers.0.self_attention"
    assert facts.roles[f"{attn}.experts.input_linear.weight"] == {"attention.query"}
    ids = torch.arange(16).reshape(2, 8)
    assert zoo.compare(facts, zoo.oracle(model, (ids,), {})) == ("agree", "")


def test_deepseek_v4_compressed_keys_come_from_the_compressor():
    """DeepSeek V4's compressed sparse attention pools the compressor's kv_proj over windows (a softmax-weighted
    sum over tokens, channels kept) into keys and values: that kv_proj gets both roles, with the channels the
    oracle sees. The pooling gate (gate_proj, softmax weights over a window) modulates them and is no projection:
    the oracle credits it, surgery does not (KNOWN in test_zoo)."""
    model = zoo.build("deepseek_v4", attn="eager")
    facts = analyze(model)
    attn = "model.layers.1.self_attn"  # compress rate 4: two windows of the 8 tokens
    assert facts.roles[f"{attn}.compressor.kv_proj"] == {"attention.key", "attention.value"}
    ids = (torch.arange(16) % 200).reshape(2, 8)
    want, got = zoo.oracle(model, (ids,), {"use_cache": False}).union(), zoo.surgery_view(facts)
    for role in ("attention.key", "attention.value"):
        assert got[f"{attn}.compressor.kv_proj", role] == want[f"{attn}.compressor.kv_proj", role]
    assert f"{attn}.compressor.gate_proj" not in facts.roles


def test_the_oracle_credits_xlnet_s_einsum_projections():
    """XLNet's q, k and v are einsums of the hidden states with 3-D parameters of the attention module
    (`rel_attn.q` [d_model, heads, d_head]): the oracle cuts those products and credits the parameters, not the
    previous layer's feed-forward output that the residual stream carries there."""
    model = zoo.build("xlnet", attn="eager")
    ids = torch.arange(16).reshape(2, 8)
    seen = zoo.oracle(model, (ids,), {}).union()
    layer = "transformer.layer.1.rel_attn"
    assert {k for k in seen if k[0].startswith("transformer.layer.1.") or k[0].endswith("ff.layer_2")} == {
        (f"{layer}.q", "attention.query"), (f"{layer}.k", "attention.key"), (f"{layer}.v", "attention.value")}
    assert seen[f"{layer}.q", "attention.query"] == frozenset(range(model.config.d_head))


def test_wavlm_s_functional_attention_reads_and_adapts_the_projections_weights():
    """WavLM passes its q/k/v/out projections' weights to F.multi_head_attention_forward (the modules are never
    called). The oracle lets that functional run op by op and cuts its F.linear calls on those weights; surgery
    traces it through modules called in its place and names the weights (sites of kind `weight`): the two agree,
    and LoRA on them changes the output exactly as the weight-space formula says."""
    import copy

    import surgery

    model = zoo.build("wavlm", attn="eager")
    inputs = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    seen = zoo.oracle(model, (inputs,), {})
    assert len(seen.calls) == model.config.num_hidden_layers
    attn = "encoder.layers.0.attention"
    width = model.config.hidden_size
    assert {k: len(v) for k, v in seen.union().items() if k[0].startswith(attn)} == {
        (f"{attn}.q_proj.weight", "attention.query"): width, (f"{attn}.k_proj.weight", "attention.key"): width,
        (f"{attn}.v_proj.weight", "attention.value"): width}
    facts = analyze(model, (inputs,))
    assert zoo.compare(facts, seen) == ("agree", "")
    assert facts.roles[f"{attn}.out_proj.weight"] == {"attention.output"}
    kinds = {s.path: s.kind for s in surgery.inspect(model, args=(inputs,)).sites}
    assert kinds[f"{attn}.q_proj.weight"] == "weight"

    reference = copy.deepcopy(model)
    base = model(inputs).last_hidden_state
    attachment = surgery.attach(model, "lora-qv", args=(inputs,))
    assert sorted(attachment.branches) == [f"encoder.layers.{i}.attention.{p}_proj.weight"
                                           for i in range(2) for p in "qv"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site, branch in attachment.branches.items():
            for p in branch.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            reference.get_parameter(site).add_(branch.scale * (branch.lora_B @ branch.lora_A))
    out = model(inputs).last_hidden_state
    assert (out - base).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(out, reference(inputs).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_gemma3n_audio_local_attention_reads_keys_and_values_through_unfold():
    """Gemma 3n's audio conformer attends in chunks: keys and values are padded and cut into overlapping blocks
    with `unfold` (a layout op, channels kept) before the scores and the context: k_proj and v_proj get the key
    and value roles, as the oracle sees them."""
    model = zoo.build("gemma3n_audio")
    args, kwargs = zoo.INPUTS["gemma3n_audio"](model)  # mel features and their mask, as a user gives them
    facts = analyze(model, args, kwargs)
    attn = "conformer.0.attention.attn"
    assert facts.roles[f"{attn}.q_proj"] == {"attention.query"}
    assert facts.roles[f"{attn}.k_proj"] == {"attention.key"}
    assert facts.roles[f"{attn}.v_proj"] == {"attention.value"}
    assert zoo.compare(facts, zoo.oracle(model, args, kwargs)) == ("agree", "")
