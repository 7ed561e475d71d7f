"""I-BERT's QuantLinear as a weight format (plugins/ibert_format.py): its float master weight is the dense view;
LoRA adds s·B(A x) to the first item of its (output, scaling factor), checked against a float64 formula, in
quant mode too; merge/unmerge restore the weight bit for bit."""
import pytest
import torch
import torch.nn.functional as F

import surgery
from tests import zoo

Q, V = "attention.query", "attention.value"


def build(dtype=torch.float32):
    torch.manual_seed(0)
    return zoo.build("ibert").to(dtype)


def ids():
    return torch.randint(5, 200, (2, 8), generator=torch.Generator().manual_seed(0))


def randomize(attachment, std=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in attachment.branches.values():
            for p in b.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_quant_linears_are_quantized_linear_sites():
    model = build()
    report = surgery.inspect(model)
    site = report.site("ibert.encoder.layer.0.attention.self.query")
    assert (site.kind, site.format, site.roles) == ("quantized_linear", "ibert_quant", {Q})
    assert not report.unknown
    plan = surgery.plan(model, "lora-qv")
    assert {p.site.path.rsplit(".", 1)[1] for p in plan.placements} == {"query", "value"}


@pytest.mark.parametrize("quant_mode", [False, True])
def test_lora_on_quant_linear_matches_float64_formula(quant_mode):
    model = build(torch.float64)
    attachment = surgery.attach(model, "lora-qv")
    randomize(attachment)
    if quant_mode:  # analysed without (quant mode calls numpy), run with it: the format reads the float weight
        for m in model.modules():
            if hasattr(m, "quant_mode"):
                m.quant_mode = True
    path = "ibert.encoder.layer.0.attention.self.value"  # its input does not depend on other branches
    host = model.get_submodule(path)
    seen = []
    hook = host.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    model(ids())
    with surgery.disabled(model):
        model(ids())
    hook.remove()
    (args, adapted), (base_args, base) = seen
    assert torch.equal(args[0], base_args[0])  # the site's input is the same with and without the branch
    branch = attachment.branches[path]
    x = args[0]
    update = branch.scale * (x @ branch.lora_A.T.double() @ branch.lora_B.T.double())
    assert update.abs().max() > 1e-6  # far above the tolerance below
    if quant_mode:
        assert adapted[1] is not None and torch.equal(adapted[1], base[1])  # the scaling factor is untouched
    else:
        w, b = host.base.weight.double(), host.base.bias.double()
        torch.testing.assert_close(base[0], F.linear(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapted[0], base[0] + update, rtol=1e-10, atol=1e-10)


def test_merge_unmerge_exact():
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attachment = surgery.attach(model, "lora-qv")
    randomize(attachment, std=0.3)
    with torch.no_grad():
        adapted = model(ids()).logits
    surgery.merge(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, adapted, rtol=1e-4, atol=1e-4)
    surgery.unmerge(model, "default")
    surgery.detach(model, "default")
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
