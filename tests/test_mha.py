"""torch.nn.MultiheadAttention: its in_proj_weight (q, k, v side by side) and out_proj.weight are sites of kind
`weight` with attention roles, and LoRA attaches there in weight space; checked against a float64 formula written
here (per head softmax(q k^T / sqrt(d) + mask) v with W_q + s·B_q·A_q, ...), through merge/unmerge (bit-exact)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery

E, H, VOCAB = 32, 4, 50
Q, K, V, O = "attention.query", "attention.key", "attention.value", "attention.output"


class Block(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(E, 64), nn.Linear(64, E)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        y = self.norm(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        a, _ = self.attn(y, y, y, key_padding_mask=pad)
        x = x + (a if self.batch_first else a.transpose(0, 1))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """An embedding, two blocks of nn.MultiheadAttention and an MLP, and a head."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.blocks = nn.ModuleList([Block(batch_first) for _ in range(2)])
        self.head = nn.Linear(E, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(input_ids)
        pad = None if attention_mask is None else attention_mask == 0
        for block in self.blocks:
            x = block(x, pad)
        return self.head(x)


def batch():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def net(batch_first: bool = True, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(batch_first).to(dtype).eval()


def randomize(attachment, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for branch in attachment.branches.values():
            for p in branch.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_mha_projections_are_weight_sites_with_attention_roles():
    model = net()
    report = surgery.inspect(model, kwargs=dict(zip(("input_ids", "attention_mask"), batch())))
    in_proj = report.site("blocks.0.attn.in_proj_weight")
    out = report.site("blocks.0.attn.out_proj.weight")
    assert (in_proj.kind, in_proj.in_features, in_proj.out_features) == ("weight", E, 3 * E)
    assert in_proj.slices == {Q: ((0, E),), K: ((E, 2 * E),), V: ((2 * E, 3 * E),)}
    assert (out.kind, out.roles, out.in_features, out.out_features) == ("weight", {O}, E, E)
    info = report.site("blocks.1.attn").attention
    assert (info.implementation, info.num_heads, info.head_dim) == ("mha", H, E // H)
    assert (info.query, info.output) == ("blocks.1.attn.in_proj_weight", "blocks.1.attn.out_proj.weight")
    assert {s.path for s in report.with_role("mlp.up")} == {"blocks.0.fc1", "blocks.1.fc1"}
    plan = surgery.plan(model, "lora-qv", args=batch())
    assert [(p.site.path, p.roles) for p in plan.placements] == [
        (f"blocks.{i}.attn.in_proj_weight", frozenset({Q, V})) for i in (0, 1)]
    assert plan.trainable == 2 * 2 * 8 * (E + E)  # per layer: q and v pairs of rank 8, [8, E] and [E, 8]
    # nothing changed on the model: the stand-ins used while tracing are gone
    assert all(type(b.attn) is nn.MultiheadAttention for b in model.blocks)


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter as stored (reading `module.<name>` while adapted gives the weight with the update)."""
    if hasattr(module, "parametrizations") and name in module.parametrizations:
        return module.parametrizations[name].original.detach()
    return getattr(module, name).detach()


def formula(mha: nn.MultiheadAttention, x: torch.Tensor, pad: torch.Tensor | None, deltas: dict) -> torch.Tensor:
    """nn.MultiheadAttention on x [B, L, E] in float64, with ΔW added to in_proj's rows and out_proj's weight."""
    w = stored(mha, "in_proj_weight").double() + deltas.get("in", 0)
    wo = stored(mha.out_proj, "weight").double() + deltas.get("out", 0)
    b, bo = mha.in_proj_bias.detach().double(), mha.out_proj.bias.detach().double()
    q, k, v = (x @ w[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E] for i in range(3))
    d = E // H
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            scores = q[n, :, cols] @ k[n, :, cols].T / math.sqrt(d)
            if pad is not None:
                scores = scores.masked_fill(pad[n][None, :], float("-inf"))
            out[n, :, cols] = torch.softmax(scores, -1) @ v[n, :, cols]
    return out @ wo.T + bo


def deltas_of(attachment, layer: str) -> dict:
    found = {}
    for key, site in (("in", f"{layer}.in_proj_weight"), ("out", f"{layer}.out_proj.weight")):
        branch = attachment.branches.get(site)
        if branch is None:
            continue
        rows = 3 * E if key == "in" else E
        delta = torch.zeros(rows, E, dtype=torch.float64)
        for part in (branch.parts.values() if hasattr(branch, "parts") else [branch]):
            index = part.channels if part.channels is not None else torch.arange(rows)
            delta[index] += part.scale * (part.lora_B.double() @ part.lora_A.double())
        found[key] = delta
    return found


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("rules", ["lora-qv", "lora-attention"])
def test_lora_on_mha_matches_float64_formula(rules, batch_first):
    model = net(batch_first, torch.float64)
    ids, mask = batch()
    attachment = surgery.attach(model, rules, args=(ids, mask))
    randomize(attachment)
    layer = "blocks.1.attn"
    mha = surgery.plugin.base_module(model, f"{layer}.in_proj_weight")
    assert isinstance(mha, nn.MultiheadAttention)
    seen = {}
    hook = model.blocks[1].norm.register_forward_hook(lambda m, a, out: seen.update(x=out))
    model.train()  # MHA's eval fast path bypasses nothing here, but train mode exercises the plain path
    logits = model(ids, mask)
    hook.remove()
    x = seen["x"].detach().requires_grad_(True)
    pad = mask == 0
    mine = model.blocks[1].attn(*(3 * [x if batch_first else x.transpose(0, 1)]), key_padding_mask=pad)[0]
    mine = mine if batch_first else mine.transpose(0, 1)
    expected = formula(mha, x, pad, deltas_of(attachment, layer))
    with surgery.disabled(model):
        base = formula(mha, x, pad, {})
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-10)
    # gradients of every pair against autograd through the formula
    probe = torch.randn(mine.shape, dtype=mine.dtype, generator=torch.Generator().manual_seed(2))
    branches = {p: attachment.branches[p] for p in attachment.branches if p.startswith(layer)}
    for b in branches.values():
        b.zero_grad()
    (mine * probe).sum().backward()
    clones = {p: copy.deepcopy(b) for p, b in branches.items()}
    for c in clones.values():
        c.zero_grad()
    reference = type("A", (), {"branches": clones})
    (formula(mha, x.detach(), pad, deltas_of(reference, layer)) * probe).sum().backward()
    for path, b in branches.items():
        for (name, p), (_, c) in zip(b.named_parameters(), clones[path].named_parameters()):
            assert p.grad is not None and p.grad.abs().max() > 0, (path, name)
            torch.testing.assert_close(p.grad, c.grad, rtol=1e-9, atol=1e-10)
    assert logits.shape == (2, 7, VOCAB)


def test_merge_unmerge_exact_and_detach_restores():
    model = net()
    ids, mask = batch()
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        base = model(ids, mask)
    attachment = surgery.attach(model, "lora-attention", args=(ids, mask))
    randomize(attachment, std=0.3)
    with torch.no_grad():
        adapted = model(ids, mask)
    assert (adapted - base).abs().max() > 1e-2
    surgery.merge(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-5, atol=1e-5)
    surgery.unmerge(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-5, atol=1e-5)
    surgery.detach(model, "default")
    after = dict(model.named_parameters())
    assert list(after) == list(params) and all(after[n] is params[n] for n in after)
    assert all(torch.equal(after[n].detach(), saved[n]) for n in after)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), base)


def test_training_and_peft_export_refused(tmp_path):
    model = net().train()
    ids, mask = batch()
    attachment = surgery.attach(model, "lora-qv", args=(ids, mask))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids, mask).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert attachment.branches
    with pytest.raises(surgery.SurgeryError, match="MultiheadAttention"):
        surgery.save(model, tmp_path / "peft", format="peft")
