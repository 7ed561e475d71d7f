"""A corpus of hostile adapter directories and rule files, generated here: each one is refused with a clear error
(a SurgeryError subclass naming the file, rule or field) in bounded time, without reading unbounded data, and the
model is left as it was. A few are not errors but must still finish in bounded time (a catastrophic regex)."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import AdaptionPromptConfig, LoHaConfig, LoraConfig, OFTConfig, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import SurgeryError
from tests.fingerprint import assert_unchanged, fingerprint

LIMIT_S = 10.0  # generous on a loaded 2-core machine; every case takes well under a second alone


def _trained(arch="llama", rules="lora-qv"):
    model = tiny.build(arch)
    surgery.attach(model, rules, name="a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    surgery.save(_trained(), root / "surgery", name="a")
    base = tiny.build("llama")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "peft")
    surgery.save(_trained("gpt2"), root / "gpt2", name="a")
    model = _trained("llama", "lora-qv")
    surgery.attach(model, "lora-qv", name="b")
    surgery.combine(model, {"a": 0.5, "b": 0.5}, name="ab")
    surgery.save(model, root / "combined", name="ab")
    qv = ["q_proj", "v_proj"]
    for name, config in {"peft-loha": LoHaConfig(r=4, alpha=8, target_modules=qv),
                         "peft-oft": OFTConfig(oft_block_size=16, r=0, target_modules=qv),
                         "peft-adaption": AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")}.items():
        get_peft_model(tiny.build("llama"), config).save_pretrained(root / name)
    return root


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _raw(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _link(path: Path, target: str) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _header(path: Path, header: dict, data: bytes = b"", claimed: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write((claimed if claimed is not None else len(blob)).to_bytes(8, "little") + blob + data)


def _sparse_tensors(path: Path, size: int) -> None:
    """A header describing `size` bytes of float32 data, and a sparse file that long: big, but costs no disk."""
    header = json.dumps({"x.lora_A": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size // 4 * 4]}}).encode()
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + size // 4 * 4)


def _sha(directory: Path) -> None:
    import hashlib

    digest = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
    _edit_json(directory / "surgery_adapter.json", lambda c: c.__setitem__("tensors_sha256", digest))


def _nan_tensors(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, directory / "adapter_model.safetensors")
    if (directory / "surgery_adapter.json").exists():
        _sha(directory)


T, C, P = "adapter_model.safetensors", "surgery_adapter.json", "adapter_config.json"

# name: (source, how to break it, what the error says)
ADAPTERS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "tensors -> /dev/zero": ("surgery", lambda d: _link(d / T, "/dev/zero"), "not a regular file"),
    "config -> /dev/zero": ("surgery", lambda d: _link(d / C, "/dev/zero"), "not a regular file"),
    "config is a FIFO": ("surgery", lambda d: _fifo(d / C), "not a regular file"),
    "tensors is a FIFO": ("surgery", lambda d: _fifo(d / T), "not a regular file"),
    "tensors is a directory": ("surgery", lambda d: ((d / T).unlink(), (d / T).mkdir()), "directory|not a regular file"),
    "config nested 100k deep": ("surgery", lambda d: _raw(d / C, b"[" * 100_000 + b"]" * 100_000), "nested"),
    "config of 17 MiB": ("surgery", lambda d: _raw(d / C, b" " * (17 << 20) + b"{}"), "more than"),
    "config with NaN": ("surgery", lambda d: _raw(d / C, b'{"a": NaN}'), "NaN is not a JSON number"),
    "config with a duplicate key": ("surgery", lambda d: _raw(d / C, b'{"a": 1, "a": 2}'), "duplicate key 'a'"),
    "config not UTF-8": ("surgery", lambda d: _raw(d / C, b'{"a": "\xff\xfe"}'), "not UTF-8"),
    "config with a huge integer": ("surgery", lambda d: _raw(d / C, b'{"a": ' + b"9" * 5000 + b"}"), "not readable JSON"),
    "name with a dot": ("surgery", lambda d: _edit_json(d / C, lambda c: c.__setitem__("name", "x.y")), "field 'name'"),
    "name escaping": ("surgery", lambda d: _edit_json(d / C, lambda c: c.__setitem__("name", "../../x")), "field 'name'"),
    "empty name": ("surgery", lambda d: _edit_json(d / C, lambda c: c.__setitem__("name", "")), "field 'name'"),
    "r = 10**9": ("surgery", lambda d: _edit_json(d / C, lambda c: c["ruleset"]["rules"][0]["params"].__setitem__("r", 10**9)),
                  "r=1000000000 is more than min"),
    "alpha = inf": ("surgery", lambda d: (_edit_json(d / C, lambda c: c["ruleset"]["rules"][0]["params"].__setitem__("alpha", 7.5)),
                                          _raw(d / C, (d / C).read_text().replace("7.5", "1e999").encode())),
                    "field 'params.alpha': must be a finite number"),
    "r = true": ("surgery", lambda d: _edit_json(d / C, lambda c: c["ruleset"]["rules"][0]["params"].__setitem__("r", True)),
                 "field 'params.r'"),
    "ruleset not a mapping": ("surgery", lambda d: _edit_json(d / C, lambda c: c.__setitem__("ruleset", [1])), "ruleset"),
    "header length 2**62": ("surgery", lambda d: _header(d / T, {}, claimed=2**62), "header claims"),
    "header nested": ("surgery", lambda d: _header(d / T, json.loads("[" * 60 + "]" * 60)), "not a valid safetensors"),
    "header with a bad entry": ("surgery", lambda d: _header(d / T, {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                                             b"\0" * 4), "bad entry"),
    "header describing 100 MB (sparse)": ("surgery", lambda d: (_sparse_tensors(d / T, 10**8), _sha(d)), "more than the"),
    "tensors with appended data": ("surgery", lambda d: (_raw(d / T, (d / T).read_bytes() + b"\0" * 1000), _sha(d)),
                                   "data appended"),
    "tensors holding NaN": ("surgery", _nan_tensors, "NaN or infinite"),
    "combined adapter, other model": ("combined-to-gpt2", lambda d: None, "missing site 'model.layers.0.self_attn.q_proj'"),
    "peft: lora_alpha a string": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("lora_alpha", "abc")),
                                  "field 'lora_alpha'"),
    "peft: lora_alpha null": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("lora_alpha", None)), "field 'lora_alpha'"),
    "peft: lora_alpha a list": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("lora_alpha", [1])), "field 'lora_alpha'"),
    "peft: lora_alpha inf": ("peft", lambda d: _raw(d / P, (d / P).read_text().replace('"lora_alpha": 8', '"lora_alpha": 1e999').encode()),
                             "field 'lora_alpha'"),
    "peft: lora_dropout a string": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("lora_dropout", "x")),
                                    "field 'lora_dropout'"),
    "peft: r a string": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("r", "4")), "field 'r'"),
    "peft: alpha_pattern value a string": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("alpha_pattern", {"q": "x"})),
                                           "field 'alpha_pattern.q'"),
    "peft: alpha_pattern a list": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("alpha_pattern", ["q"])),
                                   "field 'alpha_pattern'"),
    "peft: look-around pattern": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("alpha_pattern", {"(?=q)q": 2})),
                                  "unsupported group"),
    "peft: back-reference pattern": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("rank_pattern", {r"(a)\1": 2})),
                                     "unsupported escape"),
    "peft: rank_pattern zero": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("rank_pattern", {"q_proj": 0})),
                                "not positive"),
    "peft: rank disagrees": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("r", 8)), "rank 4 in the tensors, 8"),
    "peft: target k_proj without tensors": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "target_modules", ["q_proj", "k_proj", "v_proj"])), "target_modules selects 'model.layers.0.self_attn.k_proj'"),
    "peft: tensors the targets do not name": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("target_modules", ["q_proj"])),
                                              "which target_modules does not select"),
    "peft: config -> /dev/zero": ("peft", lambda d: _link(d / P, "/dev/zero"), "neither a surgery adapter"),
    "peft: tensors -> /dev/zero": ("peft", lambda d: _link(d / T, "/dev/zero"), "not a regular file"),
    "peft: tensors holding NaN": ("peft", _nan_tensors, "NaN or infinite"),
    "peft: target regex without tensors": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "target_modules", r".*\.(q|k|v)_proj")), "target_modules selects 'model.layers.0.self_attn.k_proj'"),
    "peft: exclude_modules a number": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("exclude_modules", 3)),
                                       "field 'exclude_modules'"),
    "peft: peft_type a list": ("peft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("peft_type", ["LORA"])),
                               "cannot be mapped"),
    "peft: config not an object": ("peft", lambda d: _raw(d / P, b"[1, 2]"), "not a JSON object"),
    "peft: pickle only": ("peft", lambda d: ((d / T).rename(d / "adapter_model.bin")), "pickle files are never loaded"),
    "peft loha: alpha a string": ("peft-loha", lambda d: _edit_json(d / P, lambda c: c.__setitem__("alpha", "x")), "field 'alpha'"),
    "peft loha: r true": ("peft-loha", lambda d: _edit_json(d / P, lambda c: c.__setitem__("r", True)), "field 'r'"),
    "peft loha: module_dropout 2": ("peft-loha", lambda d: _edit_json(d / P, lambda c: c.__setitem__("module_dropout", 2)),
                                    "field 'module_dropout'"),
    "peft loha: target k_proj without tensors": ("peft-loha", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "target_modules", ["q_proj", "k_proj", "v_proj"])), "target_modules selects 'model.layers.0.self_attn.k_proj'"),
    "peft loha: catastrophic rank_pattern": ("peft-loha", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "rank_pattern", {"(a*)*\\1": 2})), "unsupported escape"),
    "peft loha: NaN factor": ("peft-loha", _nan_tensors, "NaN or infinite"),
    "peft oft: eps a string": ("peft-oft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("eps", "x")), "field 'eps'"),
    "peft oft: block size negative": ("peft-oft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("oft_block_size", -1)),
                                      "field 'oft_block_size'"),
    "peft oft: terms 10**9": ("peft-oft", lambda d: _edit_json(d / P, lambda c: c.__setitem__("num_cayley_neumann_terms", 10**9)),
                              "field 'num_cayley_neumann_terms'"),
    "peft adaption: adapter_len a string": ("peft-adaption", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "adapter_len", "3")), "field 'adapter_len'"),
    "peft adaption: adapter_layers 0": ("peft-adaption", lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "adapter_layers", 0)), "field 'adapter_layers'"),
    "peft: huge rank in the header": ("peft", lambda d: _header(d / T, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [10**6, 64], "data_offsets": [0, 256 * 10**6]},
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": {"dtype": "F32", "shape": [64, 10**6], "data_offsets": [256 * 10**6, 512 * 10**6]},
    }), "truncated"),
}

# not errors, but bounded in time: PEFT patterns that make Python's backtracking `re` run for ever
SLOW_REGEX = {
    "peft: catastrophic alpha_pattern": lambda d: _edit_json(d / P, lambda c: c.__setitem__("alpha_pattern", {"(.|.)*Q": 4})),
    "peft: catastrophic target regex": lambda d: _edit_json(d / P, lambda c: c.__setitem__(
        "target_modules", r"(.*\.)*(q|v)_proj|(a|a)*b")),
}


def _broken(sources: Path, tmp_path: Path, source: str, breaking: Callable[[Path], None]) -> tuple[Path, str]:
    arch = "gpt2" if source == "combined-to-gpt2" else "llama"
    directory = _copy(sources / ("combined" if source == "combined-to-gpt2" else source), tmp_path / "adapter")
    breaking(directory)
    return directory, arch


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_hostile_adapter_directories_are_refused(sources, tmp_path, case):
    source, breaking, message = ADAPTERS[case]
    directory, arch = _broken(sources, tmp_path, source, breaking)
    model = tiny.build(arch)
    before = fingerprint(model)
    started = time.monotonic()
    with pytest.raises(SurgeryError, match=message):
        surgery.load(model, directory)
    assert time.monotonic() - started < LIMIT_S
    assert_unchanged(model, before, case)


@pytest.mark.parametrize("case", list(SLOW_REGEX))
def test_catastrophic_peft_patterns_load_in_bounded_time(sources, tmp_path, case):
    directory, arch = _broken(sources, tmp_path, "peft", SLOW_REGEX[case])
    model = tiny.build(arch)
    started = time.monotonic()
    try:
        surgery.load(model, directory)
    except SurgeryError:
        pass
    assert time.monotonic() - started < LIMIT_S


# ---- rule files --------------------------------------------------------------------------------------------------

RULE = "name: x\nrules:\n  - select: {roles: [attention.query]}\n    method: lora\n"
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + RULE

RULE_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not UTF-8": (lambda p: p.write_bytes(b"name: \xff\xfe\n" + RULE.encode()[8:]), "not UTF-8"),
    "duplicate key": (lambda p: p.write_text(RULE + "name: y\n"), "duplicate key 'name'"),
    "duplicate param": (lambda p: p.write_text(RULE + "    params: {r: 4, r: 8}\n"), "duplicate key 'r'"),
    "billion laughs": (lambda p: p.write_text(LAUGHS), "too large"),
    "nested 10k deep": (lambda p: p.write_text("[" * 10_000 + "]" * 10_000), "not valid YAML"),
    "r: yes": (lambda p: p.write_text(RULE + "    params: {r: yes}\n"), "field 'params.r'"),
    "r: '8'": (lambda p: p.write_text(RULE + "    params: {r: '8'}\n"), "field 'params.r'"),
    "alpha: .nan": (lambda p: p.write_text(RULE + "    params: {alpha: .nan}\n"), "field 'params.alpha': must be a finite"),
    "alpha: -.inf": (lambda p: p.write_text(RULE + "    params: {alpha: -.inf}\n"), "must be a finite"),
    "nested param nan": (lambda p: p.write_text(RULE.replace("lora", "prompt-tuning").replace(
        "attention.query", "embedding.input") + "    params: {init_ids: [.nan]}\n"), "params.init_ids.0"),
    "optional: yes-string": (lambda p: p.write_text(RULE + "    optional: maybe\n"), "field 'optional'"),
    "-> /dev/zero": (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    "a FIFO": (lambda p: os.mkfifo(p), "not a regular file"),
    "2 MiB": (lambda p: p.write_text(RULE + "#" * (2 << 20)), "more than"),
    "python object tag": (lambda p: p.write_text("!!python/object/apply:os.system ['true']\n"), "not valid YAML"),
    "r: 10**9": (lambda p: p.write_text(RULE + "    params: {r: 1000000000}\n"), "r=1000000000 is more than min"),
    "bottleneck: 10**9": (lambda p: p.write_text(RULE.replace("attention.query", "mlp.down").replace("lora", "adapter")
                                                 + "    params: {bottleneck: 1000000000}\n"), "bottleneck=1000000000"),
    "10**9 virtual tokens": (lambda p: p.write_text(RULE.replace("lora", "prompt-tuning").replace("attention.query", "embedding.input")
                                                    + "    params: {num_virtual_tokens: 1000000000}\n"), "new parameters, more than"),
    "10**9 prefix tokens": (lambda p: p.write_text(RULE.replace("lora", "prefix").replace("roles: [attention.query]", "kinds: [attention]")
                                                   + "    params: {num_virtual_tokens: 1000000000}\n"), "new parameters, more than"),
    "huge encoder": (lambda p: p.write_text(RULE.replace("lora", "p-tuning").replace("attention.query", "embedding.input")
                                            + "    params: {encoder_hidden: 1000000000}\n"), "new parameters, more than"),
    "loha r: 10**9": (lambda p: p.write_text(RULE.replace("lora", "loha") + "    params: {r: 1000000000}\n"),
                      "loha at .*r=1000000000 is more than min"),
    "loha alpha: .inf": (lambda p: p.write_text(RULE.replace("lora", "loha") + "    params: {alpha: .inf}\n"), "finite"),
    "lokr r: 'x'": (lambda p: p.write_text(RULE.replace("lora", "lokr") + "    params: {r: x}\n"), "field 'params.r'"),
    "oft block_size -3": (lambda p: p.write_text(RULE.replace("lora", "oft") + "    params: {block_size: -3, r: 0}\n"),
                          "field 'params.block_size'"),
    "oft r and block_size": (lambda p: p.write_text(RULE.replace("lora", "oft") + "    params: {block_size: 8, r: 8}\n"),
                             "give exactly one of r"),
    "llama-adapter 10**9 tokens": (lambda p: p.write_text(RULE.replace("lora", "llama-adapter").replace(
        "roles: [attention.query]", "kinds: [attention]") + "    params: {adapter_len: 1000000000}\n"), "new parameters, more than"),
    "vera r: 10**9": (lambda p: p.write_text(RULE.replace("lora", "vera") + "    params: {r: 1000000000}\n"),
                      "vera at .*r=1000000000 is more than 4 x max|no method 'vera'|unknown method"),
}


@pytest.mark.parametrize("case", list(RULE_FILES))
def test_hostile_rule_files_are_refused(tmp_path, case):
    write, message = RULE_FILES[case]
    path = tmp_path / "rules.yaml"
    write(path)
    model = tiny.build("llama")
    before = fingerprint(model)
    started = time.monotonic()
    with pytest.raises(SurgeryError, match=message) as err:
        surgery.attach(model, str(path), name="a")
    assert str(path) in str(err.value) or "site" in str(err.value)
    assert time.monotonic() - started < LIMIT_S
    assert_unchanged(model, before, case)


def test_the_linear_time_matcher_agrees_with_re():
    """`surgery.plugin.Pattern` matches what Python's `re` matches, on random patterns of the supported subset."""
    import random
    import re

    from surgery.plugin import Pattern

    rng = random.Random(0)
    atoms = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", "(a|b)", "(?:ab)", "x", "[a-c]", r"\w"]
    quantifiers = ["", "", "*", "+", "?", "{2}", "{1,3}", "{0,}", "*?"]

    def pattern(depth=0):
        parts = [("(" + pattern(depth + 1) + ")" if depth < 2 and rng.random() < 0.2 else rng.choice(atoms))
                 + rng.choice(quantifiers) for _ in range(rng.randint(1, 4))]
        text = "".join(parts) + ("|" + pattern(depth + 1) if rng.random() < 0.2 else "")
        return ("^" if rng.random() < 0.1 else "") + text + ("$" if rng.random() < 0.1 else "")

    checked = 0
    for _ in range(400):
        p = pattern()
        compiled = Pattern(p)
        for _ in range(10):
            text = "".join(rng.choice("ab.x1_") for _ in range(rng.randint(0, 8)))
            assert compiled.fullmatch(text) == bool(re.fullmatch(p, text)), (p, text)
            checked += 1
    assert checked == 4000
    assert Pattern(r"(?P<layer>\d+)\.q").fullmatch("12.q") and not Pattern(r"(?P<layer>\d+)\.q").fullmatch("x.q")
    started = time.monotonic()
    assert not Pattern(r"(?:.*\.)?(?:(.|.)*Q)").fullmatch("a" * 200 + "x")  # exponential for `re`
    assert time.monotonic() - started < 1.0


# ---- random corruptions ------------------------------------------------------------------------------------------

LONG = os.environ.get("SURGERY_LONG", "") not in ("", "0")
CORRUPTIONS = int(os.environ.get("SURGERY_HOSTILE_CORRUPTIONS", "400" if LONG else "24"))
HOSTILE_STATS: dict[str, int] = {"cases": 0, "refused": 0, "loaded": 0}


def _corrupt(rng, data: bytes) -> bytes:
    """One random corruption of a file's bytes: flipped bytes, a cut, an insertion, or a digit changed."""
    how = rng.choice(["flip", "cut", "insert", "digit", "swap"])
    data = bytearray(data)
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "cut":
        del data[rng.randrange(len(data)):]
    elif how == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.choice([b"9" * rng.randint(1, 30), b"[" * 200, b"\xff", b'"', b"NaN", b"-1", b"1e999"])
    elif how == "digit":
        digits = [i for i, c in enumerate(data) if chr(c).isdigit()]
        if digits:
            data[rng.choice(digits)] = ord(rng.choice("0123456789"))
    else:
        i, j = rng.randrange(len(data)), rng.randrange(len(data))
        data[i], data[j] = data[j], data[i]
    return bytes(data)


@pytest.mark.parametrize("source", ["surgery", "peft", "peft-loha", "peft-oft"])
def test_random_corruptions_are_refused_clearly_or_load(sources, tmp_path, source):
    """Random corruptions of an adapter's files (the config or the tensors): each load either succeeds with finite
    outputs or raises a SurgeryError, in bounded time, and a refused load leaves the model unchanged."""
    import random

    rng = random.Random(f"{source}-{os.environ.get('SURGERY_HOSTILE_SEED', '0')}")
    model = tiny.build("llama")
    x = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    for i in range(CORRUPTIONS // 4):
        directory = _copy(sources / source, tmp_path / f"c{i}")
        target = rng.choice(sorted(p for p in directory.iterdir() if p.is_file()))
        target.write_bytes(_corrupt(rng, target.read_bytes()))
        before = fingerprint(model)
        started = time.monotonic()
        HOSTILE_STATS["cases"] += 1
        try:
            surgery.load(model, directory, name="c")
        except SurgeryError:
            HOSTILE_STATS["refused"] += 1
            assert_unchanged(model, before, f"{source} corruption {i} of {target.name}")
        else:
            HOSTILE_STATS["loaded"] += 1
            with torch.no_grad():  # finite tensors and params are all a load checks: a byte flip can leave a
                # huge finite entry (an OFT block whose Cayley-Neumann series then overflows); counted, not refused
                if not torch.isfinite(model(x).logits).all():
                    HOSTILE_STATS["loaded, non-finite outputs"] = HOSTILE_STATS.get("loaded, non-finite outputs", 0) + 1
            surgery.detach(model, "c")
        assert time.monotonic() - started < LIMIT_S


def teardown_module(module):
    if os.environ.get("SURGERY_SM_REPORT"):
        print(f"\nhostile: {len(ADAPTERS)} adapter directories, {len(SLOW_REGEX)} slow patterns, {len(RULE_FILES)} rule "
              f"files, random corruptions {HOSTILE_STATS}")
