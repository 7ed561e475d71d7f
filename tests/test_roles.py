"""Graph analysis: sites, roles, fused slices and attention facts read from dataflow."""
from __future__ import annotations

import time

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn

from custom_models import Block, Misnamed, TinyGLM

from surgery import tiny
from surgery.analysis.facts import GraphFacts, LinearFacts, analyze
from surgery.analysis.tracing import example_inputs, export_for_analysis
from surgery.core.sites import ROLES, AttentionInfo

Q, K, V, O = "attention.query", "attention.key", "attention.value", "attention.output"
GATE, UP, DOWN = "mlp.gate", "mlp.up", "mlp.down"
EMBED, HEAD = "embedding.input", "lm_head"
H, KV, D, HIDDEN, FFN = 4, 2, 16, 64, 96  # tiny.py: 4 heads, 2 KV heads (where configurable), head_dim 16
_TF = Version(transformers.__version__)
NEOX_HEAD = "lm_head" if _TF >= Version("5.14") else "embed_out"  # renamed in transformers 5.14
# transformers 5.2-5.14 build Falcon's mask through torch.vmap (an and_mask_function), which the analysis
# cannot replay: the mask is unreadable there, so its causality is None
FALCON_CAUSAL = None if Version("5.2") <= _TF < Version("5.15") else True


def seq(start: int, width: int) -> tuple[tuple[int, int], ...]:
    return ((start, start + width),)


def interleaved(heads: int, head_dim: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """GPT-NeoX / old Falcon: per head [q_h, k_h, v_h]."""
    return {role: tuple(((3 * h + j) * head_dim, (3 * h + j + 1) * head_dim) for h in range(heads))
            for j, role in enumerate((Q, K, V))}


def grouped(heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Falcon new_decoder_architecture: per KV group [q heads of the group..., k, v]."""
    per = heads // kv_heads + 2
    q, k, v = [], [], []
    for g in range(kv_heads):
        base = g * per * head_dim
        q.append((base, base + (per - 2) * head_dim))
        k.append((base + (per - 2) * head_dim, base + (per - 1) * head_dim))
        v.append((base + (per - 1) * head_dim, base + per * head_dim))
    return {Q: tuple(q), K: tuple(k), V: tuple(v)}


def attn(owner, q, k, v, o, heads=H, kv=KV, causal=True, cross=False):
    return owner, dict(query=q, key=k, value=v, output=o, num_heads=heads, num_kv_heads=kv, head_dim=D,
                       cross=cross, causal=causal)


def llama_like(i: int, prefix: str = "model.layers"):
    p = f"{prefix}.{i}"
    roles = {f"{p}.self_attn.q_proj": {Q}, f"{p}.self_attn.k_proj": {K}, f"{p}.self_attn.v_proj": {V},
             f"{p}.self_attn.o_proj": {O}, f"{p}.mlp.gate_proj": {GATE}, f"{p}.mlp.up_proj": {UP},
             f"{p}.mlp.down_proj": {DOWN}}
    a = attn(f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj",
             f"{p}.self_attn.o_proj")
    return roles, {}, [a]


def phi3(i: int):
    p = f"model.layers.{i}"
    qkv, gu = f"{p}.self_attn.qkv_proj", f"{p}.mlp.gate_up_proj"
    roles = {qkv: {Q, K, V}, f"{p}.self_attn.o_proj": {O}, gu: {GATE, UP}, f"{p}.mlp.down_proj": {DOWN}}
    slices = {qkv: {Q: seq(0, H * D), K: seq(H * D, KV * D), V: seq((H + KV) * D, KV * D)},
              gu: {GATE: seq(0, FFN), UP: seq(FFN, FFN)}}
    return roles, slices, [attn(f"{p}.self_attn", qkv, qkv, qkv, f"{p}.self_attn.o_proj")]


def gpt2(i: int):
    p = f"transformer.h.{i}"
    qkv = f"{p}.attn.c_attn"
    roles = {qkv: {Q, K, V}, f"{p}.attn.c_proj": {O}, f"{p}.mlp.c_fc": {UP}, f"{p}.mlp.c_proj": {DOWN}}
    slices = {qkv: {Q: seq(0, HIDDEN), K: seq(HIDDEN, HIDDEN), V: seq(2 * HIDDEN, HIDDEN)}}
    return roles, slices, [attn(f"{p}.attn", qkv, qkv, qkv, f"{p}.attn.c_proj", kv=H)]


def opt(i: int):
    p = f"model.decoder.layers.{i}"
    roles = {f"{p}.self_attn.q_proj": {Q}, f"{p}.self_attn.k_proj": {K}, f"{p}.self_attn.v_proj": {V},
             f"{p}.self_attn.out_proj": {O}, f"{p}.fc1": {UP}, f"{p}.fc2": {DOWN}}
    return roles, {}, [attn(f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                            f"{p}.self_attn.v_proj", f"{p}.self_attn.out_proj", kv=H)]


def gpt_neox(i: int):
    p = f"gpt_neox.layers.{i}"
    qkv = f"{p}.attention.query_key_value"
    roles = {qkv: {Q, K, V}, f"{p}.attention.dense": {O}, f"{p}.mlp.dense_h_to_4h": {UP},
             f"{p}.mlp.dense_4h_to_h": {DOWN}}
    return roles, {qkv: interleaved(H, D)}, [attn(f"{p}.attention", qkv, qkv, qkv, f"{p}.attention.dense", kv=H)]


def falcon(i: int):
    p = f"transformer.h.{i}"
    qkv = f"{p}.self_attention.query_key_value"
    roles = {qkv: {Q, K, V}, f"{p}.self_attention.dense": {O}, f"{p}.mlp.dense_h_to_4h": {UP},
             f"{p}.mlp.dense_4h_to_h": {DOWN}}
    return roles, {qkv: grouped(H, KV, D)}, [attn(f"{p}.self_attention", qkv, qkv, qkv,
                                                   f"{p}.self_attention.dense", causal=FALCON_CAUSAL)]


def bert(i: int):
    p = f"bert.encoder.layer.{i}"
    s = f"{p}.attention.self"
    roles = {f"{s}.query": {Q}, f"{s}.key": {K}, f"{s}.value": {V}, f"{p}.attention.output.dense": {O},
             f"{p}.intermediate.dense": {UP}, f"{p}.output.dense": {DOWN}}
    return roles, {}, [attn(s, f"{s}.query", f"{s}.key", f"{s}.value", f"{p}.attention.output.dense", kv=H,
                            causal=False)]


def t5(i: int):
    roles, atts = {}, []
    for side, layers in (("encoder", ("SelfAttention", "DenseReluDense")),
                         ("decoder", ("SelfAttention", "EncDecAttention", "DenseReluDense"))):
        for j, name in enumerate(layers):
            p = f"{side}.block.{i}.layer.{j}.{name}"
            if name == "DenseReluDense":
                roles.update({f"{p}.wi": {UP}, f"{p}.wo": {DOWN}})
                continue
            roles.update({f"{p}.q": {Q}, f"{p}.k": {K}, f"{p}.v": {V}, f"{p}.o": {O}})
            atts.append(attn(p, f"{p}.q", f"{p}.k", f"{p}.v", f"{p}.o", kv=H, cross=name == "EncDecAttention",
                             causal=side == "decoder" and name == "SelfAttention"))
    return roles, {}, atts


ARCHS = {  # arch -> (per-layer expectation, {embedding.input paths}, lm_head path)
    "llama": (llama_like, {"model.embed_tokens"}, "lm_head"),
    "mistral": (llama_like, {"model.embed_tokens"}, "lm_head"),
    "qwen2": (llama_like, {"model.embed_tokens"}, "lm_head"),
    "phi3": (phi3, {"model.embed_tokens"}, "lm_head"),
    "gpt2": (gpt2, {"transformer.wte"}, "lm_head"),
    "opt": (opt, {"model.decoder.embed_tokens"}, "lm_head"),
    "gpt_neox": (gpt_neox, {"gpt_neox.embed_in"}, NEOX_HEAD),
    "falcon": (falcon, {"transformer.word_embeddings"}, "lm_head"),
    "bert": (bert, {"bert.embeddings.word_embeddings"}, "cls.predictions.decoder"),
    "t5": (t5, {"encoder.embed_tokens", "decoder.embed_tokens"}, "lm_head"),  # tied weights, separate modules
}


def expected(arch: str, attn_impl: str, layers: int = 2):
    per_layer, embeds, head = ARCHS[arch]
    roles, slices, atts = {}, {}, {}
    for i in range(layers):
        r, s, a = per_layer(i)
        roles.update(r)
        slices.update(s)
        atts.update({owner: AttentionInfo(implementation=attn_impl, **info) for owner, info in a})
    roles.update({e: {EMBED} for e in embeds})
    roles[head] = {HEAD}
    return {p: frozenset(r) for p, r in roles.items()}, slices, atts


@pytest.fixture(scope="module")
def facts_of():
    cache: dict[tuple[str, str], tuple[nn.Module, GraphFacts]] = {}

    def get(arch: str, attn_impl: str | None):
        if (arch, attn_impl) not in cache:
            model = tiny.build(arch, attn=attn_impl)
            cache[arch, attn_impl] = model, analyze(model)
        return cache[arch, attn_impl]

    return get


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_roles_slices_attention(arch, attn_impl, facts_of):
    if attn_impl == "sdpa" and not tiny.supports_sdpa(arch):
        pytest.skip(f"no sdpa for {arch} in transformers {transformers.__version__}")
    model, facts = facts_of(arch, attn_impl)
    roles, slices, atts = expected(arch, attn_impl)
    assert facts.roles == roles
    assert facts.slices == slices
    assert facts.attention == atts
    assert all(r <= set(ROLES) for r in facts.roles.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_linears_and_embeddings_cover_model(arch, facts_of):
    from transformers.pytorch_utils import Conv1D

    model, facts = facts_of(arch, None)  # sdpa where transformers has it
    linear_like = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    called = {n for n in embeddings if n != "shared"}  # T5's `shared` is never called in transformers 5
    assert set(facts.linears) == linear_like
    assert set(facts.embeddings) == called
    for path, lf in facts.linears.items():
        weight = model.get_submodule(path).weight
        assert lf.transposed == isinstance(model.get_submodule(path), Conv1D)
        assert tuple(weight.shape) == ((lf.in_features, lf.out_features) if lf.transposed
                                       else (lf.out_features, lf.in_features))
    for path, ef in facts.embeddings.items():
        assert tuple(model.get_submodule(path).weight.shape) == (ef.num_embeddings, ef.embedding_dim)


def _groups(facts: GraphFacts) -> list[set[str]]:
    groups: dict[str, set[str]] = {}
    for path, first in facts.input_groups.items():
        groups.setdefault(first, set()).add(path)
    return sorted(groups.values(), key=sorted)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_input_groups_are_the_linears_reading_one_tensor(arch, facts_of):
    model, facts = facts_of(arch, None)  # sdpa where transformers has it
    per_layer = {
        "llama": ["model.layers.{i}.self_attn.{{q,k,v}}_proj", "model.layers.{i}.mlp.{{gate,up}}_proj"],
        "mistral": ["model.layers.{i}.self_attn.{{q,k,v}}_proj", "model.layers.{i}.mlp.{{gate,up}}_proj"],
        "qwen2": ["model.layers.{i}.self_attn.{{q,k,v}}_proj", "model.layers.{i}.mlp.{{gate,up}}_proj"],
        "opt": ["model.decoder.layers.{i}.self_attn.{{q,k,v}}_proj"],
        "bert": ["bert.encoder.layer.{i}.attention.self.{{query,key,value}}"],
        "t5": ["encoder.block.{i}.layer.0.SelfAttention.{{q,k,v}}", "decoder.block.{i}.layer.0.SelfAttention.{{q,k,v}}"],
    }.get(arch, [])  # gpt2, phi3, falcon, gpt_neox: fused projections, one module per input

    def expand(pattern: str) -> set[str]:
        head, names, tail = pattern.partition("{")[0], pattern.partition("{")[2].partition("}")[0], pattern.partition("}")[2]
        return {head + n + tail for n in names.split(",")}

    want = [expand(p.format(i=i)) for p in per_layer for i in range(2)]
    if arch == "t5":  # every cross-attention k and v reads the encoder's output
        want.append({f"decoder.block.{i}.layer.1.EncDecAttention.{n}" for i in range(2) for n in "kv"})
    assert _groups(facts) == sorted(want, key=sorted)
    assert all(facts.input_groups[first] == first for first in facts.input_groups.values())


@pytest.mark.parametrize("multi_query,kv", [(True, 1), (False, H)])
def test_falcon_old_architecture_slices(multi_query, kv):
    model = tiny.build("falcon", new_decoder_architecture=False, multi_query=multi_query, num_kv_heads=kv)
    facts = analyze(model)
    for i in range(2):
        qkv = f"transformer.h.{i}.self_attention.query_key_value"
        want = ({Q: seq(0, H * D), K: seq(H * D, D), V: seq((H + 1) * D, D)} if multi_query
                else interleaved(H, D))
        assert facts.slices[qkv] == want
        info = facts.attention[f"transformer.h.{i}.self_attention"]
        assert (info.num_heads, info.num_kv_heads, info.head_dim) == (H, kv, D)


TOKENS = (torch.zeros(2, 8, dtype=torch.long),)


def test_misnamed_custom_model():
    model = Misnamed()
    facts = analyze(model, TOKENS)
    hd = 8
    for i in range(3):  # every block, though the trace kept one
        p = f"stack.{i}"
        assert facts.roles[f"{p}.mix.proj_in"] == {Q, K, V}
        assert facts.roles[f"{p}.mix.a"] == {O}
        assert facts.roles[f"{p}.ff.a"] == {GATE}
        assert facts.roles[f"{p}.ff.c"] == {UP}
        assert facts.roles[f"{p}.ff.b"] == {DOWN}
        per_head = {role: tuple(((3 * h + j) * hd, (3 * h + j + 1) * hd) for h in range(4))
                    for j, role in enumerate((K, V, Q))}  # laid out [k_h, v_h, q_h] per head
        assert facts.slices[f"{p}.mix.proj_in"] == per_head
        assert facts.linears[f"{p}.ff.b"] == LinearFacts(48, 32, False, torch.float32)  # int4, dequantized in forward
        assert facts.attention[f"{p}.mix"] == AttentionInfo("sdpa", *[f"{p}.mix.proj_in"] * 3, f"{p}.mix.a",
                                                           num_heads=4, num_kv_heads=4, head_dim=hd, causal=True)
    assert facts.roles["table"] == {EMBED} and "where" not in facts.roles
    assert facts.roles["head"] == {HEAD}  # called through the alias `readout`, reported under its first name
    assert "readout" not in facts.linears and len(facts.roles) == 3 * 5 + 2


def test_custom_model_mixed_blocks():
    model = Misnamed()
    model.stack[1] = Block(32, 4, 40)
    facts = analyze(model, TOKENS)
    assert [facts.linears[f"stack.{i}.ff.a"].out_features for i in range(3)] == [48, 40, 48]
    assert all(facts.roles[f"stack.{i}.ff.b"] == {DOWN} for i in range(3))


def test_chatglm_like_block():
    model = TinyGLM()
    facts = analyze(model, TOKENS)
    for i in range(2):
        p = f"encoder.layers.{i}"
        qkv, h4 = f"{p}.self_attention.query_key_value", f"{p}.mlp.dense_h_to_4h"
        assert facts.roles[qkv] == {Q, K, V}
        assert facts.slices[qkv] == {Q: seq(0, 64), K: seq(64, 2 * D), V: seq(96, 2 * D)}
        assert facts.roles[f"{p}.self_attention.dense"] == {O}
        assert facts.roles[h4] == {GATE, UP}
        assert facts.slices[h4] == {GATE: seq(0, 80), UP: seq(80, 80)}
        assert facts.roles[f"{p}.mlp.dense_4h_to_h"] == {DOWN}
        assert facts.attention[f"{p}.self_attention.core_attention"] == AttentionInfo(
            "eager", qkv, qkv, qkv, f"{p}.self_attention.dense", num_heads=4, num_kv_heads=2, head_dim=D,
            causal=True)
    assert facts.roles["word_embeddings"] == {EMBED}
    assert facts.roles["output_layer"] == {HEAD}


def _snapshot(model: nn.Module):
    return ([(n, id(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    modules, state = _snapshot(model)
    assert modules == snapshot[0]
    assert state.keys() == snapshot[1].keys()
    assert all(torch.equal(state[k], snapshot[1][k]) for k in state)


def test_model_left_unchanged():
    model = tiny.build("llama").train()
    model.model.layers[1].mlp.eval()  # mixed flags must come back as they were
    before = _snapshot(model)
    analyze(model)
    _assert_unchanged(model, before)


def test_model_left_unchanged_on_failure():
    model = Misnamed().train()
    before = _snapshot(model)
    with pytest.raises(Exception):
        analyze(model, (torch.zeros(2, 8),))  # float token ids: the trace fails (reduced, then full)
    _assert_unchanged(model, before)


def test_cache_by_architecture():
    analyze(Misnamed(), TOKENS)
    other = Misnamed()
    start = time.perf_counter()
    facts = analyze(other, TOKENS)
    assert time.perf_counter() - start < 0.1
    facts.roles.clear()
    assert analyze(other, TOKENS).roles  # callers get copies


def test_example_inputs():
    args, kwargs = example_inputs(tiny.build("t5"))
    assert args[0].shape == (2, 8) and kwargs["decoder_input_ids"].shape[0] == 2 and kwargs["use_cache"] is False
    args, kwargs = example_inputs(tiny.build("bert"))
    assert kwargs["token_type_ids"].shape == args[0].shape
    with torch.device("meta"):
        model = tiny.build("llama")
    assert example_inputs(model)[0][0].device.type == "meta"
    with pytest.raises(TypeError, match="example args"):
        example_inputs(nn.Linear(2, 2))


def test_export_for_analysis_maps_aliases():
    trace = export_for_analysis(Misnamed(), TOKENS)
    assert trace.module_paths["readout"] == "head"
    assert trace.token_inputs == {"tokens"}


def test_smoke_timing_7b_llama_meta():
    """Smoke bound only (generous): the reduced trace should take well under a second on 2 cores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    analyze(tiny.build("gpt2", attn="eager"))  # torch.export's one-time warm-up is not ours to time
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    start = time.perf_counter()
    facts = analyze(model)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    analyze(model)
    cached = time.perf_counter() - start
    print(f"7B llama analyze: cold {cold:.3f}s, cached {cached * 1000:.1f}ms")
    assert cold < 3.0 and cached < 0.5
    assert len(facts.attention) == 32 and len(facts.linears) == 32 * 7 + 1
    assert facts.roles["model.layers.31.mlp.gate_proj"] == {GATE}
    assert facts.attention["model.layers.31.self_attn"].head_dim == 128
    assert {p for p, first in facts.input_groups.items() if first == "model.layers.31.self_attn.q_proj"} == {
        f"model.layers.31.self_attn.{n}_proj" for n in "qkv"}


def _padded_batch(model: nn.Module) -> dict:
    """A real padded batch, as a user passes it: ids, an attention_mask with padding in row 0 (and
    token_type_ids / decoder ids where the model takes them)."""
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        batch.update(decoder_input_ids=ids[:, :5], decoder_attention_mask=torch.ones(2, 5, dtype=torch.long))
    elif getattr(model.config, "type_vocab_size", 0):
        batch["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    if "use_cache" in __import__("inspect").signature(model.forward).parameters:
        batch["use_cache"] = False
    return batch


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_user_padded_mask_keeps_every_site(arch, attn_impl, facts_of):
    """The user's own padded attention_mask (its mask add depends on a user input too) changes no reading."""
    if attn_impl == "sdpa" and not tiny.supports_sdpa(arch):
        pytest.skip(f"no sdpa for {arch} in transformers {transformers.__version__}")
    model, facts = facts_of(arch, attn_impl)
    masked = analyze(model, kwargs=_padded_batch(model))
    assert masked.roles == facts.roles
    assert masked.slices == facts.slices
    assert masked.attention == facts.attention  # causal read from the mask as if unpadded


def test_plan_lora_qv_with_a_padded_batch_eager():
    import surgery

    for arch in ("llama", "gpt2", "bert", "opt", "t5"):
        model = tiny.build(arch, attn="eager")
        placed = surgery.plan(model, "lora-qv", kwargs=_padded_batch(model))
        unmasked = surgery.plan(model, "lora-qv")
        assert [p.site.path for p in placed.placements] == [p.site.path for p in unmasked.placements]
        assert len(placed.placements) == {"t5": 12, "gpt2": 2}.get(arch, 4)  # gpt2: one fused c_attn a layer


def test_plan_with_a_users_batch_as_given():
    """A batch without use_cache=False (a decoder would return its cache, which export cannot hold): surgery asks
    for no cache itself, and a forward that cannot take the batch gives a TraceError naming the model."""
    import surgery
    from surgery.errors import TraceError

    for arch in ("llama", "gpt2", "t5"):
        model = tiny.build(arch)
        batch = {k: v for k, v in _padded_batch(model).items() if k != "use_cache"}
        placed = surgery.plan(model, "lora-qv", kwargs=batch)
        assert [p.site.path for p in placed.placements] == \
            [p.site.path for p in surgery.plan(model, "lora-qv", kwargs=_padded_batch(model)).placements]
    model = tiny.build("bert")
    with pytest.raises(TraceError, match="BertForMaskedLM.*inputs given.*attention_mask=int64\\[2, 5\\]"):
        surgery.inspect(model, kwargs={"input_ids": torch.ones(2, 4, dtype=torch.long),
                                       "attention_mask": torch.ones(2, 5, dtype=torch.long)})


def test_inputs_from_the_models_main_input_and_config():
    from surgery.analysis.tracing import input_candidates

    with torch.device("meta"):
        t5 = tiny.build("t5")
    candidates = input_candidates(t5)
    assert candidates[0][0][0].device.type == "meta"
    assert {"use_cache": False}.items() <= candidates[0][1].items()
    assert any("attention_mask" in kwargs for _, kwargs in candidates)  # longt5's local attention needs one
    assert all("use_cache" not in kwargs for _, kwargs in candidates[len(candidates) // 2:])  # then without


def test_trace_error_names_the_model_and_the_inputs_tried():
    from transformers import PretrainedConfig, PreTrainedModel

    from surgery.errors import TraceError

    class NeedsBoxes(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.lin = nn.Linear(4, 4)

        def forward(self, input_ids, boxes):
            return self.lin(boxes)

    tried = r"Tried:\n  \(input_ids=int64\[2, 8\]"
    with pytest.raises(TraceError, match=r"NeedsBoxes.*main input 'input_ids'.*boxes.*" + tried):
        analyze(NeedsBoxes(PretrainedConfig(vocab_size=16)))


def test_inputs_that_failed_only_on_the_depth_reduced_view_are_tried_again():
    """XCodec's first inputs (mono audio as [batch, samples]) fail alike at any depth; its second fail only on
    the depth-reduced view (fewer downsampling convolutions in the semantic branch: lengths that no longer
    match the acoustic branch's), so at full depth they are tried again and trace."""
    import zoo

    if "xcodec" not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no xcodec")
    facts = analyze(zoo.build("xcodec", attn="eager"))
    assert {"fc", "fc2"} <= set(facts.linears)


def _classifier(name: str, **values):
    import transformers

    config = tiny.config("bert", num_labels=3, **values) if name.startswith("Bert") else \
        tiny.config("llama", num_labels=3, pad_token_id=0, **values)
    torch.manual_seed(0)
    return getattr(transformers, name)(config).eval()


def test_pooler_and_task_head_are_never_mlp():
    facts = analyze(_classifier("BertForSequenceClassification"))
    assert facts.roles["bert.pooler.dense"] == {"pooler"}
    assert facts.roles["classifier"] == {"head"}
    for i in range(2):
        assert facts.roles[f"bert.encoder.layer.{i}.intermediate.dense"] == {UP}
        assert facts.roles[f"bert.encoder.layer.{i}.output.dense"] == {DOWN}
    assert analyze(_classifier("BertForTokenClassification")).roles["classifier"] == {"head"}
    assert analyze(_classifier("LlamaForSequenceClassification")).roles["score"] == {"head"}
    base = analyze(tiny.build("bert"))  # a masked LM: the prediction head's transform is no pooler
    assert "bert.pooler.dense" not in base.roles and base.roles["cls.predictions.decoder"] == {HEAD}


@pytest.mark.parametrize("rules", ["lora-all-linear", "ia3", "adapter-houlsby", "adapter-pfeiffer", "adapter-parallel"])
def test_builtin_rule_sets_leave_the_classifier_alone(rules):
    import surgery

    plan = surgery.plan(_classifier("BertForSequenceClassification"), rules)
    paths = {p.site.path for p in plan.placements}
    assert "classifier" not in paths
    if rules != "lora-all-linear":  # LoRA on every linear keeps the pooler, as PEFT's all-linear does
        assert "bert.pooler.dense" not in paths
    assert paths


def _per_head(heads: int, stride: int, start: int, width: int) -> tuple[tuple[int, int], ...]:
    return tuple((h * stride + start, h * stride + start + width) for h in range(heads))


def test_multi_head_latent_attention_slices():
    """DeepSeek-V3: q from q_b_proj; k from kv_b_proj's nope channels of each head and kv_a_proj_with_mqa's rope
    part (written in place into one key tensor); v from kv_b_proj's other channels. Exact, as the oracle says."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                              q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    model = DeepseekV3ForCausalLM(config).eval()
    facts = analyze(model)
    p = "model.layers.0.self_attn"
    assert facts.roles[f"{p}.q_b_proj"] == {Q} and f"{p}.q_b_proj" not in facts.slices
    assert facts.roles[f"{p}.kv_a_proj_with_mqa"] == {K}
    assert facts.slices[f"{p}.kv_a_proj_with_mqa"] == {K: seq(32, 8)}  # the rope part only
    assert facts.roles[f"{p}.kv_b_proj"] == {K, V}
    assert facts.slices[f"{p}.kv_b_proj"] == {K: _per_head(4, 24, 0, 8), V: _per_head(4, 24, 8, 16)}
    info = facts.attention[p]
    assert (info.num_heads, info.num_kv_heads, info.cross, info.causal) == (4, 4, False, True)


def test_gated_query_slices():
    """Qwen3-Next: q_proj holds per head [query, output gate]; only the query channels are attention.query, and
    the gate (sigmoid(gate) * attention output) makes no MLP."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=["full_attention"],
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32)
    model = Qwen3NextForCausalLM(config).eval()
    facts = analyze(model)
    p = "model.layers.0.self_attn"
    assert facts.roles[f"{p}.q_proj"] == {Q}
    assert facts.slices[f"{p}.q_proj"] == {Q: _per_head(4, 32, 0, 16)}
    assert facts.roles[f"{p}.o_proj"] == {O}
    assert (facts.attention[p].num_heads, facts.attention[p].num_kv_heads) == (4, 2)


def _moe(config_name: str, model_name: str, **values):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2, **values)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def test_moe_experts_are_sites_with_mlp_roles():
    import surgery

    model = _moe("MixtralConfig", "MixtralForCausalLM")
    report = surgery.inspect(model)
    p = "model.layers.0.mlp.experts"
    gate_up, down = report.site(f"{p}.gate_up_proj"), report.site(f"{p}.down_proj")
    assert (gate_up.kind, gate_up.num_experts, gate_up.in_features, gate_up.out_features) == ("experts", 4, 64, 192)
    assert gate_up.roles == {GATE, UP} and gate_up.slices == {GATE: seq(0, 96), UP: seq(96, 96)}
    assert (down.kind, down.in_features, down.out_features, down.roles) == ("experts", 96, 64, {DOWN})
    assert report.unknown == ["model.layers.0.mlp.gate"]  # the router: a linear-like with no weight format yet
    assert report.unknown_roles["model.layers.0.mlp.gate"] == {"mlp.router"}
    assert "(mlp.router)" in str(report)
    assert {s.path for s in report.with_role(DOWN)} == {f"{p}.down_proj"}  # a rule selecting mlp.* finds them
    # methods that take no stacked experts refuse them by name; LoRA and lora-all-linear adapt them (test_experts_lora)
    with pytest.raises(surgery.RuleFileError, match="of kind 'experts', which method 'ia3' does not accept"):
        surgery.plan(model, surgery.RuleSet.model_validate(
            {"name": "mlp", "rules": [{"select": {"roles": ["mlp.down"]}, "method": "ia3"}]}))
    assert {p.site.path for p in surgery.plan(model, "lora-all-linear").placements if p.site.kind == "experts"} == {
        f"{p}.gate_up_proj", f"{p}.down_proj"}


def test_moe_experts_interleaved_gate_up():
    """GPT-OSS stores gate_up [experts, in, out] with gate and up channels interleaved."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    config._attn_implementation = "eager"
    facts = analyze(GptOssForCausalLM(config).eval())
    p = "model.layers.0.mlp.experts"
    assert facts.experts[f"{p}.gate_up_proj"].transposed and facts.experts[f"{p}.gate_up_proj"].out_features == 64
    assert facts.slices[f"{p}.gate_up_proj"] == {GATE: tuple((c, c + 1) for c in range(0, 64, 2)),
                                                 UP: tuple((c, c + 1) for c in range(1, 64, 2))}
    assert facts.roles[f"{p}.down_proj"] == {DOWN}
    assert facts.roles["model.layers.0.mlp.router"] == {"mlp.router"}


def _shifted_right(ids: torch.Tensor) -> torch.Tensor:
    shifted = ids.new_zeros(ids.shape)
    shifted[:, 1:] = ids[:, :-1]
    shifted[:, 0] = 2
    return shifted


def _placeholders_zeroed(ids: torch.Tensor) -> torch.Tensor:
    kept = ids.clone()
    kept[ids >= 30] = 0
    return kept


_ID_SUBSTITUTIONS = {
    "where": lambda ids: torch.where(ids >= 30, torch.zeros_like(ids), ids),  # Gemma 4
    "index_put": _placeholders_zeroed,  # PaliGemma, Gemma 3: ids[mask] = 0 on a clone
    "masked_fill": lambda ids: ids.masked_fill(ids >= 30, 0),
    "keep_mask": lambda ids: ids * (ids < 30),
    "clamp_offset": lambda ids: (ids - 2).clamp(min=0) % 30,
    "cat": lambda ids: torch.cat([torch.full_like(ids[:, :1], 2), ids[:, 1:]], dim=1),
    "shifted_right": _shifted_right,  # decoder ids made from the ids, as shift_tokens_right does
}


@pytest.mark.parametrize("substitute", list(_ID_SUBSTITUTIONS))
def test_token_ids_through_substitutions_before_the_lookup(substitute):
    """Multimodal models replace placeholder ids before the lookup: still the input embedding and LM head; a
    position lookup computed from the ids (RoBERTa's cumulative sum of the non-padding mask) is neither."""
    from surgery.analysis.facts import _CACHE

    class Substituted(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.positions = nn.Embedding(10, 16)
            self.out = nn.Linear(16, 32, bias=False)

        def forward(self, ids):
            keep = ids.ne(1).int()
            positions = (torch.cumsum(keep, dim=1) * keep).long() + 1
            return self.out(self.embed(_ID_SUBSTITUTIONS[substitute](ids)) + self.positions(positions))

    _CACHE.clear()  # one class name and structure for every substitution
    facts = analyze(Substituted(), TOKENS)
    _CACHE.clear()
    assert facts.roles == {"embed": {EMBED}, "out": {HEAD}}


def test_einsum_with_a_3d_weight_is_experts_only_when_batched_over_its_first_dim():
    class Einsums(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.proj = nn.Parameter(torch.randn(16, 2, 8))  # XLNet-style: [hidden, heads, head_dim]
            self.experts = nn.Parameter(torch.randn(4, 8, 16))  # [experts, in, out]

        def forward(self, ids):
            h = self.embed(ids)  # [b, s, 16]
            p = torch.einsum("bsh,hnd->bsnd", h, self.proj).reshape(2, 8, 16)
            grouped = p.reshape(4, 4, 16)[..., :8]  # four "experts" of four tokens each
            return torch.einsum("ecd,edf->ecf", grouped, self.experts)

    facts = analyze(Einsums(), TOKENS)
    assert list(facts.experts) == ["experts"]
    assert (facts.experts["experts"].num_experts, facts.experts["experts"].in_features,
            facts.experts["experts"].out_features) == (4, 8, 16)


def test_an_attention_length_that_depends_on_the_data_is_unknown_not_a_crash():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from surgery.analysis import attention
    unbacked = ShapeEnv().create_unbacked_symint()  # a size computed from the data (Mimi's conv strides on a mask)
    assert attention._lengths(unbacked, 3) is None
    assert attention._lengths(4, 3) == (4, 3)


def test_inputs_for_video_models_and_patch_grid_vision_towers():
    """Video frames where the config counts frames (or the input is pixel_values_videos), and flattened patches
    with their (time, height, width) grid for Qwen2-VL-like vision towers: the inputs surgery makes run them."""
    from transformers import Qwen2_5_VLConfig, VideoMAEConfig, VideoMAEModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from surgery.analysis.tracing import input_candidates

    video = VideoMAEModel(VideoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=16, num_frames=2,
                                         tubelet_size=2)).eval()
    facts = analyze(video)
    assert facts.roles["encoder.layer.0.attention.attention.query"] == {Q}
    vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLConfig(vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=8,
        fullatt_block_indexes=[0])).vision_config).eval()
    args, kwargs = input_candidates(vision)[0]
    grid = kwargs["grid_thw"]
    assert grid.tolist() == [[1, 4, 4]] and args[0].shape == (16, 3 * 2 * 8 * 8)  # 4x4 patches, 2 frames each
    with torch.no_grad():
        assert vision(*args, **kwargs).last_hidden_state.shape[0] == 16  # a token a patch


@pytest.mark.parametrize("model_type", ["omniasr_ctc", "glmasr_encoder", "audioflamingo3_encoder", "blip",
                                        "patchtst", "timesfm"])
def test_inputs_surgery_makes_run_the_model(model_type):
    """Mono audio as [batch, 1, samples], mel bins first, an input_features_mask, token ids beside an image,
    time series (past_values, their padding and frequency): some candidate surgery makes runs the model."""
    import zoo

    from surgery.analysis.tracing import input_candidates

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    model = zoo.build(model_type)
    zoo.runnable_inputs(model, input_candidates(model))  # raises the first candidate's error where none runs


def test_rope_as_a_complex_product_summed_over_pairs_keeps_q_and_k():
    """PE Audio applies rope as `(q.reshape(..., -1, 1, 2) * freqs).sum(5)`: the walk back from the attention's
    operands passes the sum to q_proj and k_proj."""
    import zoo

    facts = analyze(zoo.build("pe_audio_encoder", attn="eager"))
    assert facts.roles["layers.0.self_attn.q_proj"] == {Q}
    assert facts.roles["layers.0.self_attn.k_proj"] == {K}
    assert facts.attention["layers.0.self_attn"].query == "layers.0.self_attn.q_proj"
