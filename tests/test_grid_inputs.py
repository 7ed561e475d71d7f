"""Vision towers whose sizes come from the values of an integer input (Qwen2-VL's `grid_thw`: `.tolist()` split
sizes, `repeat_interleave`, a cumsum into `cu_seqlens`): traced with that input fixed
(`surgery/analysis/fixed_inputs.py`), each vision attention's fused qkv is read as query, key and value by exact
slices, on the tower alone and inside the whole model given a user's batch; the model is left as it was."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import surgery
from surgery.analysis.facts import _CACHE, analyze
from surgery.analysis.fixed_inputs import fixed_inputs, value_inputs

Q, K, V, O = "attention.query", "attention.key", "attention.value", "attention.output"
WIDTH = 32

pytestmark = pytest.mark.usefixtures("fresh_analysis_cache")


def _tower(config_class: str, model_class: str, **vision: object) -> nn.Module:
    """A two-block vision tower of width 32 (2 heads) from the model's config class, random weights, eval mode."""
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    config = getattr(transformers, config_class)(vision_config=dict(
        depth=2, hidden_size=WIDTH, intermediate_size=64, num_heads=2, out_hidden_size=WIDTH, patch_size=8,
        **vision)).vision_config
    module = __import__(getattr(transformers, config_class).__module__.replace("configuration_", "modeling_"),
                        fromlist=[model_class])
    torch.manual_seed(0)
    return getattr(module, model_class)._from_config(config).eval()


TOWERS = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VisionTransformerPretrainedModel",
                   dict(fullatt_block_indexes=[1], window_size=16)),  # windows: cu_window_seqlens, unique_consecutive
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLVisionModel",
                 dict(num_position_embeddings=16, deepstack_visual_indexes=[0])),  # position grid read by .tolist()
    "glm4v": ("Glm4vConfig", "Glm4vVisionModel", dict(image_size=32)),  # embeddings interpolated to the grid
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_each_vision_attention_of_a_grid_tower_has_its_qkv_slices(name):
    """surgery's own inputs (flattened patches and their grid): every block's fused qkv carries query, key and
    value in thirds, and its proj is the output; the tower's forward is its own again afterwards."""
    config_class, model_class, vision = TOWERS[name]
    tower = _tower(config_class, model_class, **vision)
    facts = analyze(tower)
    for block in range(2):
        qkv, proj = f"blocks.{block}.attn.qkv", f"blocks.{block}.attn.proj"
        assert facts.roles[qkv] == {Q, K, V}, (qkv, facts.roles.get(qkv))
        assert facts.slices[qkv] == {Q: ((0, WIDTH),), K: ((WIDTH, 2 * WIDTH),), V: ((2 * WIDTH, 3 * WIDTH),)}
        assert facts.roles[proj] == {O}
    assert "forward" not in vars(tower)


@pytest.mark.parametrize("name", ["qwen3_vl", "glm4v"])
def test_a_grid_tower_on_the_meta_device_reads_as_with_real_weights(name):
    """A tower built on the meta device: surgery makes its grid on the cpu (the trace reads the grid's values and
    moves what it computes from them to the meta device where it meets the tower's tensors), and reads the same
    roles and slices as on the real tower."""
    config_class, model_class, vision = TOWERS[name]
    if name == "qwen3_vl" and hasattr(__import__("transformers.models.qwen3_vl.modeling_qwen3_vl", fromlist=["x"]),
                                      "get_vision_bilinear_indices_and_weights"):
        pytest.skip(f"transformers {transformers.__version__}'s Qwen3-VL tower takes its position embedding at "
                    "indices from transformers.vision_utils: on the meta device that trace fails (a known gap)")
    real = analyze(_tower(config_class, model_class, **vision))
    _CACHE.clear()
    with torch.device("meta"):
        tower = _tower(config_class, model_class, **vision)
    assert next(tower.parameters()).device.type == "meta"
    facts = analyze(tower)
    assert facts.roles == real.roles and facts.slices == real.slices
    assert facts.roles["blocks.1.attn.qkv"] == {Q, K, V}


def _qwen2_5_vl() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny Qwen2.5-VL (two vision blocks, two text layers) and a batch of one 4x4-patch image among tokens."""
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rope_parameters=dict(
                             rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=WIDTH, intermediate_size=64, num_heads=2, out_hidden_size=WIDTH,
                           patch_size=8, fullatt_block_indexes=[1]),
        image_token_id=250, video_token_id=251, vision_start_token_id=252)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    grid = torch.tensor([[1, 4, 4]])  # 16 patches, 4 tokens after the 2x2 merge
    ids = torch.tensor([[1, 2, 252, 250, 250, 250, 250, 3, 4, 5]])
    patch = 3 * 2 * 8 * 8  # channels x frames x patch x patch
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(16, patch),
                       image_grid_thw=grid, use_cache=False)


def test_a_user_batch_with_an_image_grid_reads_the_whole_model():
    """The whole image-text model given a user's batch (pixel values and image_grid_thw beside token ids):
    lora-qv is placed on the vision blocks' fused qkv (query and value) and on the text layers' q/v
    projections, and the model's output is unchanged by the reading."""
    model, batch = _qwen2_5_vl()
    with torch.no_grad():
        before = model(**batch).logits
    plan = surgery.plan(model, "lora-qv", kwargs=batch)
    placed = {p.site.path: p.roles for p in plan.placements}
    for block in range(2):
        assert placed[f"model.visual.blocks.{block}.attn.qkv"] == {Q, V}
    for layer in range(2):
        assert placed[f"model.language_model.layers.{layer}.self_attn.q_proj"] == {Q}
        assert placed[f"model.language_model.layers.{layer}.self_attn.v_proj"] == {V}
    qkv = next(s for s in surgery.inspect(model, kwargs=batch).sites if s.path == "model.visual.blocks.0.attn.qkv")
    assert qkv.slices[K] == ((WIDTH, 2 * WIDTH),)
    assert "forward" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_value_inputs_are_integer_metadata_not_per_token_data():
    """A grid, merge sizes and image sizes are fixed; token ids, masks, positions, float and meta tensors are
    not."""
    grid = torch.tensor([[1, 4, 4]])
    kwargs = dict(grid_thw=grid, image_grid_thw=grid, merge_sizes=torch.tensor([2]), image_sizes=grid[:, 1:],
                  input_ids=grid, attention_mask=grid, token_type_ids=grid, position_ids=grid,
                  pixel_values=torch.zeros(2, 3), video_grid_thw=torch.zeros(1, 3, dtype=torch.long, device="meta"),
                  flags=torch.ones(3, dtype=torch.bool))
    assert value_inputs(kwargs) == ["grid_thw", "image_grid_thw", "merge_sizes", "image_sizes"]


def test_fixed_inputs_give_the_forward_back_also_on_an_error():
    """Inside the block the forward takes the fixed input as closed over (the ops on it alone run on its values);
    on exit, also after an exception, the module's own forward is back (an instance attribute's too)."""

    class Sized(nn.Module):
        def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return x[: int(grid.prod())]

    model = Sized()
    x, grid = torch.arange(10.0), torch.tensor([2, 3])
    with fixed_inputs(model, {"grid": grid}, ["grid"]) as rest:
        assert rest == {}
        program = torch.export.export(model, (x,), rest, strict=False)
    assert "forward" not in vars(model)
    assert [n.name for n in program.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(program.module()(x), x[:6])

    def own(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return x

    model.forward = own
    with pytest.raises(RuntimeError, match="inside"), fixed_inputs(model, {"grid": grid}, ["grid"]):
        raise RuntimeError("inside")
    assert vars(model)["forward"] is own


def test_a_packing_tower_gets_its_image_size_in_patches():
    """MiniCPM-V's vision tower packs images of any size and reads each one's size in patches from `target_sizes`
    (position ids by `.tolist()`): surgery makes one image with its size, fixes the sizes for the trace, and reads
    each layer's q/k/v projections."""
    import zoo

    from surgery.analysis.tracing import input_candidates

    if "minicpm_ocr_vision" not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no MiniCPM-OCR")
    tower = zoo.build("minicpm_ocr_vision")
    args, kwargs = input_candidates(tower)[0]
    side = tower.config.image_size // tower.config.patch_size
    assert kwargs["target_sizes"].tolist() == [[side, side]] and args[0].shape[0] == 1  # one image
    facts = analyze(tower)
    for layer in range(2):
        for name, role in (("q_proj", Q), ("k_proj", K), ("v_proj", V), ("out_proj", O)):
            assert facts.roles[f"encoder.layers.{layer}.self_attn.{name}"] == {role}
