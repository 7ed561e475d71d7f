"""Adapter directories: the checksum manifest of PEFT-format saves (checked on load where present) and the model
card written beside every saved adapter."""
import json

import pytest
import torch
import transformers

import surgery
import surgery.io.atomic
from surgery import tiny
from surgery.io.adapter_files import AdapterFileError
from surgery.io.manifest import MANIFEST
from surgery.io.model_card import CARD, MARK
from tests.conftest import assert_bit_identical, ids, snapshot

TENSORS = "adapter_model.safetensors"


def trained(arch: str = "llama", task: str | None = None):
    model = tiny.build(arch) if task is None else \
        transformers.BertForSequenceClassification(tiny.config("bert", num_labels=3)).eval()
    surgery.attach(model, "lora-qv", name="a", task=task)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def flip_last_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # inside the last tensor's data: the shapes still fit
    path.write_bytes(bytes(blob))


def test_peft_save_carries_a_manifest_that_load_checks(tmp_path):
    model = trained()
    surgery.save(model, tmp_path / "peft", name="a", format="peft")
    manifest = json.loads((tmp_path / "peft" / MANIFEST).read_text())
    assert list(manifest["sha256"]) == [TENSORS]
    fresh = tiny.build("llama")
    surgery.load(fresh, tmp_path / "peft")  # intact: loads
    x = ids()
    torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)

    edited = tiny.build("llama")
    before = snapshot(edited)
    flip_last_byte(tmp_path / "peft" / TENSORS)
    with pytest.raises(AdapterFileError, match=rf"{TENSORS}: contents do not match the SHA-256 recorded in {MANIFEST}"):
        surgery.load(edited, tmp_path / "peft")
    assert_bit_identical(edited, before)
    assert not hasattr(edited, "_surgery_ledger")
    (tmp_path / "peft" / TENSORS).write_bytes((tmp_path / "peft" / TENSORS).read_bytes()[:-100])  # truncated
    with pytest.raises(AdapterFileError, match=f"{TENSORS}: contents do not match"):
        surgery.load(edited, tmp_path / "peft")


def test_without_a_manifest_peft_dirs_load_as_before(tmp_path):
    model = trained()
    surgery.save(model, tmp_path / "peft", name="a", format="peft")
    flip_last_byte(tmp_path / "peft" / TENSORS)
    (tmp_path / "peft" / MANIFEST).unlink()
    surgery.load(tiny.build("llama"), tmp_path / "peft")  # what HF PEFT writes has no manifest: nothing to check


def test_a_broken_manifest_is_refused_by_name(tmp_path):
    model = trained()
    surgery.save(model, tmp_path / "peft", name="a", format="peft")
    path = tmp_path / "peft" / MANIFEST
    data = json.loads(path.read_text())
    data["sha256"]["gone.safetensors"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=f"gone.safetensors: no such file, but {MANIFEST} lists it"):
        surgery.load(tiny.build("llama"), tmp_path / "peft")
    data["sha256"] = {"../escape.safetensors": "0" * 64}
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="not a file name"):
        surgery.load(tiny.build("llama"), tmp_path / "peft")
    path.write_text("{not json")
    with pytest.raises(AdapterFileError, match="not a readable surgery manifest"):
        surgery.load(tiny.build("llama"), tmp_path / "peft")


@pytest.mark.parametrize("format", ["surgery", "peft"])
def test_model_card_is_written_atomically_with_the_adapter(tmp_path, monkeypatch, format):
    model = trained(task="sequence-classification")
    model.config._name_or_path = "org/tiny-bert"
    written = []
    real = surgery.io.atomic.write_directory

    def spy(directory, files):
        written.append(sorted(files))
        return real(directory, files)

    monkeypatch.setattr("surgery.io.adapter_files.write_directory", spy)
    monkeypatch.setattr("surgery_plugins.peft_format.write_directory", spy)
    surgery.save(model, tmp_path / "out", name="a", format=format)
    assert len(written) == 1 and CARD in written[0]  # one atomic write holds the card and the adapter
    card = (tmp_path / "out" / CARD).read_text()
    assert card.startswith("---\n" + MARK + "\n")
    branch_params = sum(p.numel() for h in model._surgery_ledger.attachments["a"].branches.values()
                        for p in h.parameters())
    base_params = sum(p.numel() for n, p in model.named_parameters() if ".branches." not in n)
    for text in ("| method | lora (4 sites), copy (1 site) |", "`lora-qv+sequence-classification`",
                 "`org/tiny-bert`, `transformers.models.bert.modeling_bert.BertForSequenceClassification`",
                 f"| trainable parameters | {branch_params:,} (", f"of the base model's {base_params:,})",
                 f"surgery {surgery.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
                 'base_model: "org/tiny-bert"', f"library_name: {'peft' if format == 'peft' else 'surgery'}"):
        assert text in card, text


def test_a_users_readme_is_kept_and_ours_is_rewritten(tmp_path):
    model = trained()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / CARD).write_text("# my notes\n")
    surgery.save(model, tmp_path / "mine", name="a")
    assert (tmp_path / "mine" / CARD).read_text() == "# my notes\n"
    surgery.save(model, tmp_path / "ours", name="a")
    card = tmp_path / "ours" / CARD
    card.write_text(card.read_text().replace("lora (4 sites)", "edited"))  # ours, still marked: rewritten
    surgery.save(model, tmp_path / "ours", name="a", format="peft")
    assert "lora (4 sites)" in card.read_text() and "peft format" in card.read_text()
