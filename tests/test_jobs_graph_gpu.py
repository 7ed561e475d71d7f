"""surgery.jobs(cuda_graph=True) on a GPU: the graphed steps give the eager steps' losses and parameters, step after
step, on fresh data each step; a changed float lr is another graph; a step that cannot be captured (it reads a value
to the host) runs eagerly, with a warning, and still right; a graph slower than the eager step is dropped; padded
batches and LoRA dropout are captured too. Skipped without CUDA; the CPU refusals are in tests/test_jobs.py."""
from __future__ import annotations

import warnings

import pytest
import torch

import surgery
from surgery import tiny
from tests.test_jobs import model_with, params_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

NAMES = ("a", "b", "c")


def setup(graph: bool, loss=surgery.causal_lm_loss):
    model = model_with(NAMES).cuda().train()
    opts = {n: torch.optim.AdamW(params_of(model, n).values(), lr=1e-2, capturable=True) for n in NAMES}
    return model, opts, surgery.jobs(model, opts, loss=loss, cuda_graph=graph)


def data(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {n: {"input_ids": torch.randint(1, 100, (b, 6), generator=g).cuda()} for n, b in zip(NAMES, (1, 2, 1))}


def run(jobs, opts, steps: int, lr_from: dict | None = None, alternate: bool = False) -> list[dict]:
    """Losses of `steps` steps on fresh data; with `alternate`, odd steps train jobs a and c only, on longer rows."""
    out = []
    for step in range(steps):
        for n, lr in (lr_from or {}).get(step, {}).items():
            opts[n].param_groups[0]["lr"] = lr
        batches = data(step)
        if alternate and step % 2:
            batches = {n: {"input_ids": torch.cat([b["input_ids"]] * 2, 1)} for n, b in batches.items() if n != "b"}
        out.append({n: float(v) for n, v in jobs.step(batches).items()})
        assert all(p.grad is None for n in NAMES for p in params_of(jobs.model, n).values())
    return out


def same_losses(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=1e-5), f"step {step}"


def same(eager_model, graphed_model):
    for n in NAMES:
        for k, p in params_of(graphed_model, n).items():
            torch.testing.assert_close(p, params_of(eager_model, n)[k], rtol=1e-5, atol=1e-6)


def test_graphed_steps_equal_eager_steps():
    eager_model, eager_opts, eager = setup(False)
    graphed_model, graphed_opts, graphed = setup(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: here it must not happen
        got = run(graphed, graphed_opts, 6)
    assert len(graphed.graphs._graphs) == 1  # steps 3-6 replayed one graph
    assert graphed.graphs.eager == {}  # and timed against the eager step (step 2), it was kept
    same_losses(got, run(eager, eager_opts, 6))
    same(eager_model, graphed_model)


def test_a_graph_slower_than_the_eager_step_is_dropped_and_the_steps_stay_right(monkeypatch):
    from surgery.engine import step_graphs
    side = step_graphs._on_side_stream

    def instant(step, inputs, timing=None):  # the eager step timed as if it took no time at all
        outputs = side(step, inputs)
        if timing is not None:
            timing[0].record()
            timing[1].record()
        return outputs
    monkeypatch.setattr(step_graphs, "_on_side_stream", instant)
    eager_model, eager_opts, eager = setup(False)
    graphed_model, graphed_opts, graphed = setup(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # dropping a slower graph is no failure: no warning
        got = run(graphed, graphed_opts, 9)  # 2 eager warm-ups, 3 timed replays, then eager again
    assert not graphed.graphs._graphs
    assert [reason.startswith("its graph was slower") for reason in graphed.graphs.eager.values()] == [True]
    same_losses(got, run(eager, eager_opts, 9))
    same(eager_model, graphed_model)


def test_two_graphs_replayed_in_turn_share_their_memory_and_stay_right():
    eager_model, eager_opts, eager = setup(False)
    graphed_model, graphed_opts, graphed = setup(True)
    got = run(graphed, graphed_opts, 12, alternate=True)
    assert len(graphed.graphs._graphs) == 2
    same_losses(got, run(eager, eager_opts, 12, alternate=True))
    same(eager_model, graphed_model)


def test_a_changed_float_lr_is_another_graph():
    lr_from = {4: {"b": 3e-3}}
    eager_model, eager_opts, eager = setup(False)
    graphed_model, graphed_opts, graphed = setup(True)
    got = run(graphed, graphed_opts, 9, lr_from)
    assert len(graphed.graphs._graphs) == 2
    same_losses(got, run(eager, eager_opts, 9, lr_from))
    same(eager_model, graphed_model)


def test_a_step_that_reads_to_the_host_runs_eagerly_with_a_warning():
    def loss(logits, labels):
        value = surgery.causal_lm_loss(logits, labels)
        return value * (1.0 if value.item() > -1 else 0.0)  # waits for the device: not capturable
    eager_model, eager_opts, eager = setup(False, loss)
    graphed_model, graphed_opts, graphed = setup(True, loss)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = run(graphed, graphed_opts, 5)
    assert not graphed.graphs._graphs
    same_losses(got, run(eager, eager_opts, 5))
    same(eager_model, graphed_model)


def padded(step: int) -> dict:
    """Fresh data whose jobs' rows differ in length: the joint batch is right-padded and masked."""
    g = torch.Generator().manual_seed(200 + step)
    return {n: {"input_ids": torch.randint(1, 100, (b, t), generator=g).cuda()}
            for n, b, t in zip(NAMES, (1, 2, 1), (6, 4, 5))}


def test_graphed_steps_of_padded_batches_equal_eager_steps():
    eager_model, _, eager = setup(False)
    graphed_model, _, graphed = setup(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = [{n: float(v) for n, v in graphed.step(padded(i)).items()} for i in range(6)]
    assert len(graphed.graphs._graphs) + len(graphed.graphs.eager) == 1
    assert all("slower" in reason for reason in graphed.graphs.eager.values())  # captured, whatever was kept
    same_losses(got, [{n: float(v) for n, v in eager.step(padded(i)).items()} for i in range(6)])
    same(eager_model, graphed_model)


def test_graphed_steps_with_lora_dropout_are_captured_and_draw_new_masks_each_replay():
    """Dropout in a graph: torch's generator is graph-safe, so each replay draws new masks. With lr 0 the weights
    stay put and every step sees the same batch: the replays' losses differ from each other (new masks), and
    their mean is the eager steps' (the same distribution of masks)."""
    def build(graph):
        model = tiny.build("llama").cuda()
        for p in model.parameters():
            p.requires_grad_(False)
        rules = surgery.RuleSet(name="d", rules=[surgery.Rule(select=surgery.Selector(kinds=["linear"]),
                                exclude=surgery.Selector(roles=["lm_head"]), method="lora",
                                params={"r": 4, "dropout": 0.3})])
        g = torch.Generator().manual_seed(3)
        for name in NAMES:
            surgery.attach(model, rules, name=name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.train()
        opts = {n: torch.optim.AdamW(params_of(model, n).values(), lr=0.0, capturable=True) for n in NAMES}
        return surgery.jobs(model, opts, cuda_graph=graph)
    batch = data(0)
    graphed, eager = build(True), build(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = [graphed.step(batch)["a"].item() for _ in range(40)]
    assert len(graphed.graphs._graphs) + len(graphed.graphs.eager) == 1
    assert all("slower" in reason for reason in graphed.graphs.eager.values())
    want = [eager.step(batch)["a"].item() for _ in range(40)]
    replays = got[2:]
    assert len(set(replays)) > len(replays) // 2  # new masks at (nearly) every replay
    spread = torch.tensor(want).std().item()
    assert abs(sum(got) / len(got) - sum(want) / len(want)) < 3 * spread / len(want) ** 0.5 * 1.5
