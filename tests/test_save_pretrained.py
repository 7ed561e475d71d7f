"""`model.save_pretrained(...)` and HF Trainer checkpoints of an adapted model: the plain model's keys (so
`from_pretrained` gives the base model exactly), each attachment beside it in `adapters/<name>/`."""
import copy

import pytest
import torch
import transformers

import surgery
from surgery import tiny
from surgery.engine.plain_save import plain_state_dict
from surgery.errors import LedgerError
from tests.conftest import ids, logits


def randomized(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


@pytest.mark.parametrize("arch, auto", [("llama", "AutoModelForCausalLM"), ("gpt2", "AutoModelForCausalLM")])
def test_save_pretrained_writes_the_base_model_and_the_adapters_beside(tmp_path, arch, auto):
    model = tiny.build(arch)
    base_state = copy.deepcopy(model.state_dict())
    surgery.attach(model, "lora-qv", name="a")
    surgery.attach(model, "ia3", name="b")
    randomized(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved" / "adapters").iterdir()) == ["a", "b"]
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "saved").eval()
    assert_same_state(loaded, base_state)  # the base model, bit for bit: no wrapped key, no adapter tensor
    surgery.load(loaded, tmp_path / "saved" / "adapters" / "a")
    surgery.load(loaded, tmp_path / "saved" / "adapters" / "b")
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)
    surgery.detach(model, "a")
    surgery.detach(model, "b")
    assert "save_pretrained" not in model.__dict__  # the plain model's own method again


def test_save_pretrained_refuses_merged_weights(tmp_path):
    model = randomized(tiny.build("llama"))
    surgery.attach(model, "lora-qv", name="a")
    randomized(model)
    surgery.merge(model, "a")
    with pytest.raises(LedgerError, match="'a' is merged into the weights.*unmerge first.*bake"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    surgery.unmerge(model, "a")
    model.save_pretrained(tmp_path / "saved")


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(tiny.config("bert", num_labels=3, hidden_dropout_prob=0.0,
                                                                  attention_probs_dropout_prob=0.0))


def train(model, out, data, resume=None):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no",
                                          disable_tqdm=True, seed=0, data_seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
    return model.eval()


def test_trainer_checkpoints_of_an_adapted_classifier_load_and_resume(tmp_path):
    model = classifier()
    base_state = copy.deepcopy(model.state_dict())
    surgery.attach(model, "lora-qv", task="sequence-classification")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 128, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    train(model, tmp_path / "run", data)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    x = ids()
    expected = model(input_ids=x).logits
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert_same_state(loaded, base_state)  # the frozen base, exactly; the trained head is in the adapter
    surgery.load(loaded, checkpoint / "adapters" / "default")
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=0, atol=0)
    assert not torch.equal(loaded.classifier.branches["default"].module.weight, base_state["classifier.weight"])
    # resuming at step 2 (the adapter loaded first; the checkpoint's plain keys go into the base modules) ends
    # where the uninterrupted run did
    resumed = classifier(seed=1)  # other random weights: the base comes from the checkpoint
    surgery.load(resumed, tmp_path / "run" / "checkpoint-2" / "adapters" / "default")
    train(resumed, tmp_path / "again", data, resume=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(resumed(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)


def test_a_plain_state_dict_loads_into_the_base_modules_of_an_adapted_model():
    model = tiny.build("llama")
    plain = copy.deepcopy(model.state_dict())
    surgery.attach(model, "lora-qv", name="a")
    randomized(model)
    x = ids()
    expected = logits(model, x)
    own = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = model.load_state_dict(plain, strict=False)
    assert result.unexpected_keys == [] and all(".branches.a." in k for k in result.missing_keys)
    now = plain_state_dict(model, model._surgery_ledger)
    assert sorted(now) == sorted(plain) and all(torch.equal(now[k], v) for k, v in plain.items())
    model.load_state_dict(own)  # its own, wrapped keys load as ever
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=0)
