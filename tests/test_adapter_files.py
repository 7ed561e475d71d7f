"""Adapters as files: surgery's own format, HF PEFT's both ways, refusal of bad files and unfit models."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgery
import surgery.io.atomic
from surgery import tiny
from surgery.io.adapter_files import CONFIG, TENSORS, AdapterFileError, MismatchError
from tests.conftest import assert_bit_identical, ids, logits, snapshot


def trained(arch="llama", rules="lora-qv", name="a", seed=0, **build):
    model = tiny.build(arch, **build)
    surgery.attach(model, rules, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model


def test_save_load_roundtrip(tmp_path):
    model = trained("gpt2", "lora-qv")  # sliced q and v of the fused c_attn
    x = ids()
    expected = logits(model, x)
    surgery.save(model, tmp_path / "ad", name="a")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["README.md", TENSORS, CONFIG]  # + the model card
    config = json.loads((tmp_path / "ad" / CONFIG).read_text())
    assert config["name"] == "a" and config["ruleset"]["name"] == "lora-qv"
    assert config["fingerprint"]["model_class"].endswith("GPT2LMHeadModel")
    assert {p["site"]["path"] for p in config["placements"]} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    fresh = tiny.build("gpt2")
    surgery.load(fresh, tmp_path / "ad")
    assert surgery.active(fresh) == ["a"]
    torch.testing.assert_close(logits(fresh, x), expected, rtol=0, atol=0)
    surgery.load(fresh, tmp_path / "ad", name="again")
    assert surgery.active(fresh) == ["a", "again"]


def test_no_pickle_anywhere(tmp_path):
    model = trained()
    surgery.save(model, tmp_path / "ad", name="a")
    blob = (tmp_path / "ad" / TENSORS).read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    json.loads(blob[8:8 + header_len])  # a safetensors header, not a pickle
    assert b"\x80\x04" not in blob[:2]


def test_unfit_model_is_refused_with_every_mismatch(tmp_path):
    model = trained("llama", "lora-qv")
    surgery.save(model, tmp_path / "ad", name="a")
    other = tiny.build("llama", hidden_size=32, num_hidden_layers=3)
    before = snapshot(other)
    with pytest.raises(MismatchError) as err:
        surgery.load(other, tmp_path / "ad")
    text = str(err.value)
    assert "in_features is 32 here, 64 in the adapter" in text
    assert "site 'model.layers.2.self_attn.q_proj' is selected here but not in the adapter" in text
    assert len(err.value.mismatches) >= 5
    assert_bit_identical(other, before)
    assert "_surgery_ledger" not in other.__dict__
    bf16 = tiny.build("llama", dtype=torch.bfloat16)
    with pytest.raises(MismatchError, match="dtype is bfloat16 here, float32 in the adapter"):
        surgery.load(bf16, tmp_path / "ad")
    surgery.load(bf16, tmp_path / "ad", strict_dtype=False)
    torch.testing.assert_close(logits(bf16, ids()).float(), logits(model, ids()), rtol=0.1, atol=0.1)


def test_truncated_and_tampered_files(tmp_path):
    model = trained()
    directory = surgery.save(model, tmp_path / "ad", name="a")
    tensors = directory / TENSORS
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterFileError, match="do not match the SHA-256"):
        surgery.load(tiny.build("llama"), directory)
    tampered = bytearray(good)
    tampered[-3] ^= 0xFF
    tensors.write_bytes(bytes(tampered))
    with pytest.raises(AdapterFileError, match="truncated or altered"):
        surgery.load(tiny.build("llama"), directory)
    tensors.write_bytes(good)
    config = json.loads((directory / CONFIG).read_text())
    config["tensors_sha256"] = __import__("hashlib").sha256(good[:100]).hexdigest()
    tensors.write_bytes(good[:100])
    (directory / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        surgery.load(tiny.build("llama"), directory)
    (directory / CONFIG).write_text("{not json")
    with pytest.raises(AdapterFileError, match=f"{CONFIG}: not readable JSON"):
        surgery.load(tiny.build("llama"), directory)
    config["format_version"] = 7
    (directory / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="field 'format_version'"):
        surgery.load(tiny.build("llama"), directory)
    with pytest.raises(AdapterFileError, match="no such adapter directory"):
        surgery.load(tiny.build("llama"), tmp_path / "nowhere")


def test_interrupted_save_leaves_the_old_files(tmp_path, monkeypatch):
    model = trained()
    directory = surgery.save(model, tmp_path / "ad", name="a")
    old = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.branches["a"].lora_B.add_(1.0)
    written = []
    real = surgery.io.atomic._write_file

    def dies_after_first(path, data):
        if written:
            raise KeyboardInterrupt("power cut")
        written.append(path)
        real(path, data)

    monkeypatch.setattr(surgery.io.atomic, "_write_file", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        surgery.save(model, directory, name="a")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging directory left behind
    monkeypatch.undo()
    surgery.save(model, directory, name="a")
    new = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert new[TENSORS] != old[TENSORS] and new[CONFIG] != old[CONFIG]


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_peft_adapter_loads_into_surgery(tmp_path, arch, targets):
    base = tiny.build(arch)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                                rank_pattern={targets[0]: 6}, use_rslora=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    x = ids()
    expected = logits(peft_model, x)
    attachment = surgery.load(base, tmp_path / "peft", name="p")
    assert {p.params.r for p in attachment.plan.placements} == {4, 6}
    got = logits(base, x)
    with surgery.disabled(base):
        assert (logits(base, x) - got).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_surgery_adapter_loads_into_peft(tmp_path, arch):
    model = trained(arch, "lora-qv")  # on gpt2: only the q and v slices of c_attn
    x = ids()
    expected = logits(model, x)
    surgery.save(model, tmp_path / "out", name="a", format="peft")
    with surgery.disabled(model):
        base = copy.deepcopy(model)
    surgery.detach(base, "a")
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-5)
    # and back: the PEFT-format directory loads into surgery with the same outputs
    again = tiny.build(arch)
    surgery.load(again, tmp_path / "out")
    torch.testing.assert_close(logits(again, x), expected, rtol=1e-5, atol=1e-5)


def test_peft_modules_to_save_and_embeddings(tmp_path):
    from transformers import BertForSequenceClassification

    config = tiny.config("bert", num_labels=3)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    pristine = copy.deepcopy(base)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value", "word_embeddings"],
                                                                modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    x = ids()
    expected = peft_model(input_ids=x).logits
    surgery.load(base, tmp_path / "peft", name="p")
    torch.testing.assert_close(base(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    surgery.save(base, tmp_path / "back", name="p", format="peft")
    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "back")
    torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_options_that_cannot_be_mapped_are_refused(tmp_path):
    base = tiny.build("llama")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    peft_model.save_pretrained(tmp_path / "bias")
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="cannot map: lora_bias=True"):  # DoRA (use_dora) maps: test_dora.py
        surgery.load(base, tmp_path / "bias")
    assert_bit_identical(base, before)
    (tmp_path / "pickled").mkdir()
    cfg = json.loads((tmp_path / "bias" / "adapter_config.json").read_text())
    cfg["lora_bias"] = False
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterFileError, match="pickle files are never loaded"):
        surgery.load(base, tmp_path / "pickled")


@pytest.mark.parametrize("arch, rules", [("llama", "ia3"), ("bert", "ia3"), ("gpt2", "adapter-houlsby"),
                                         ("llama", "adapter-parallel"), ("llama", "prefix"), ("gpt2", "prompt-tuning")])
def test_every_method_saves_and_loads(tmp_path, arch, rules):
    model = tiny.build(arch)
    x = ids()
    reference = logits(model, x)
    surgery.attach(model, rules, name="m")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    expected = logits(model, x)
    assert not torch.allclose(expected[:, -x.shape[1]:], reference, atol=1e-4)  # prompts add virtual positions
    surgery.save(model, tmp_path / "m", name="m")
    fresh = tiny.build(arch)
    surgery.load(fresh, tmp_path / "m")
    torch.testing.assert_close(logits(fresh, x), expected, rtol=0, atol=0)
    surgery.detach(fresh, "m")
    torch.testing.assert_close(logits(fresh, x), reference, rtol=0, atol=0)
