"""benchmarks/bench_bounds.py counts what a LoRA step adds to the floor by formula; here the count is held against
what surgery's own step adds, measured by torch's flop counter on the CPU."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_bounds
import harness

import surgery

CONFIG = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 8, "num_key_value_heads": 2,
          "num_hidden_layers": 2, "vocab_size": 128, "max_position_embeddings": 64}


def addmm_(c, a, b, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def added_flops(r: int, roles: list[str] | None) -> tuple[int, int, surgery.RuleSet]:
    """(matmul flops that LoRA adds to one forward and backward with gradients to the input embeddings, tokens,
    the model). The counter knows no in-place addmm_, which the fused paths use: it is counted as addmm."""
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    model = harness.llama(CONFIG).train()

    def count() -> int:
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as counter:
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
        return counter.get_total_flops()
    floor = count()
    surgery.attach(model, harness.lora_rules(roles, r=r), name="a")
    return count() - floor, ids.numel(), model


@pytest.mark.parametrize("r", [4, 16])
def test_lora_flops_are_surgerys_at_lone_linears(r):
    """o and down, alone at their inputs: surgery's step adds exactly the formula's six matmuls."""
    added, tokens, _ = added_flops(r, ["attention.output", "mlp.down"])
    shapes, _ = bench_bounds.linears(CONFIG, ("o_proj", "down_proj"))
    assert sum(shapes.values()) == 2 * CONFIG["num_hidden_layers"]
    assert added == bench_bounds.lora_flops(shapes, tokens, r) > 0


@pytest.mark.parametrize("r", [4, 16])
def test_lora_flops_bound_surgerys_step(r):
    """On every linear, surgery adds at least the formula's flops, and at most those plus the zero blocks of the
    gate/up update taken inside the base matmul (shared.py: each member multiplies the group's whole h); its
    parameters are the ones AdamW's bytes are counted over."""
    added, tokens, model = added_flops(r, None)
    work = bench_bounds.counts(CONFIG, tokens, r, 4)
    wide, _ = bench_bounds.linears(CONFIG, ("gate_proj", "up_proj"))
    zero_blocks = sum(n * 2 * tokens * o * r for (i, o), n in wide.items())  # one other member's r columns
    assert work["lora_flops"] <= added <= work["lora_flops"] + zero_blocks
    assert work["lora_params"] == sum(p.numel() for p in surgery.adapter_parameters(model, "a"))


def test_layer_inputs_are_the_adapted_linears_distinct_inputs():
    """q/k/v read one input, gate/up another; o and down their own: hidden, heads × head_dim, hidden, MLP width."""
    shapes, head = bench_bounds.linears(CONFIG)
    assert {i for i, _ in shapes} == {64, 160} and head == (64, 128)
    assert sum(shapes.values()) == 7 * CONFIG["num_hidden_layers"]
    assert bench_bounds.layer_inputs(CONFIG) == 64 + 64 + 64 + 160
    # separate kernels: each distinct input read twice (h, dA) and its dx term written; each output's term written
    # and its dy read once (dh and dB in one pass)
    outputs = 64 + 16 + 16 + 64 + 160 + 160 + 64
    assert bench_bounds.counts(CONFIG, 10, 4, 2)["separate_bytes"] == 2 * 10 * 2 * (3 * 352 + 2 * outputs)
