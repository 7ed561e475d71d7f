"""The `surgery` console script: tables and JSON against the library's own answers, merge against the adapted
model and against HF PEFT, one-line errors and exit codes. Runs `surgery.cli.main` in-process."""
import json
import shutil
import subprocess

import pytest
import torch

import surgery
import surgery.cli.main
from surgery import tiny
from surgery.cli.main import main
from surgery.cli.models import load_model
from surgery.core.registry import manager
from surgery.rules.schema import builtin_rulesets, json_schema
from tests.conftest import ids

COMMANDS = ["inspect", "plan", "merge", "rules", "plugins"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_lines(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-llama-dir"
    tiny.build("llama").save_pretrained(path)
    (path / "special_tokens_map.json").write_text("{}")
    return path


# ---- inspect ------------------------------------------------------------------------------------------------


def test_inspect_table_has_every_site_row_and_roles(capsys):
    code, out, err = run(capsys, "inspect", "tiny-llama")
    assert code == 0 and err == ""
    report = surgery.inspect(tiny.build("llama"))
    lines = table_lines(out)
    for row in report.rows():
        assert " ".join(row).split() in lines, f"row {row} missing from the table"
    assert f"{len(report.sites)} sites in {report.model_class}" in out
    assert not any(line != line.rstrip() for line in out.splitlines()), "trailing spaces in piped output"


def test_inspect_json_matches_report_including_fused_slices(capsys):
    code, out, _ = run(capsys, "inspect", "tiny-gpt2", "--json")
    assert code == 0
    data = json.loads(out)
    report = surgery.inspect(tiny.build("gpt2"))
    assert [s["path"] for s in data["sites"]] == [s.path for s in report.sites]
    for got, site in zip(data["sites"], report.sites):
        assert got["kind"] == site.kind and got["roles"] == sorted(site.roles)
        assert got["slices"] == {r: [list(x) for x in v] for r, v in site.slices.items()}
    c_attn = next(s for s in data["sites"] if s["path"] == "transformer.h.0.attn.c_attn")
    assert set(c_attn["slices"]) == {"attention.query", "attention.key", "attention.value"}
    attention = next(s for s in data["sites"] if s["kind"] == "attention")
    assert attention["attention"]["num_heads"] == 4


def test_tiny_name_with_hyphens_is_the_underscore_architecture():
    model = load_model("tiny-gpt-neox")
    reference = tiny.build("gpt_neox")
    assert type(model) is type(reference)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_inspect_directory_reads_the_config_only(capsys, tmp_path):
    """A directory is inspected from its config on the meta device: no weight file is needed, the dtype is the config's."""
    tiny.config("llama").save_pretrained(tmp_path)  # config.json only, no weights
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(dtype="bfloat16", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    from_dir = json.loads(out)["sites"]
    reference = surgery.inspect(tiny.build("llama", dtype=torch.bfloat16))
    assert [(s["path"], s["kind"], s["roles"], s["dtype"]) for s in from_dir] == \
        [(s.path, s.kind, sorted(s.roles), str(s.dtype).replace("torch.", "") if s.dtype else None) for s in reference.sites]
    assert {s["dtype"] for s in from_dir} == {"bfloat16", None}


def test_directory_model_keeps_its_head_and_weights(llama_dir):
    model = load_model(str(llama_dir))
    reference = tiny.build("llama")
    assert type(model) is type(reference)
    torch.testing.assert_close(model(input_ids=ids()).logits, reference(input_ids=ids()).logits, rtol=0, atol=0)


# ---- plan ---------------------------------------------------------------------------------------------------


def test_plan_counts_match_an_actual_attach(capsys):
    code, out, _ = run(capsys, "plan", "tiny-gpt2", "--rules", "lora-qv", "--json")
    assert code == 0
    data = json.loads(out)
    model = tiny.build("gpt2")
    surgery.attach(model, "lora-qv", name="a")
    count = surgery.trainable_parameters(model)
    assert data["trainable"] == count.trainable == sum(p["trainable"] for p in data["placements"])
    assert data["total_parameters"] == count.total - count.trainable
    assert [p["site"] for p in data["placements"]] == list(model._surgery_ledger.attachments["a"].branches)
    assert all(p["roles"] == ["attention.query", "attention.value"] and p["params"]["r"] == 8 for p in data["placements"])


def test_plan_table_from_a_rule_file(capsys, tmp_path):
    rules = tmp_path / "mlp.yaml"
    rules.write_text("name: mlp-down\nrules:\n  - select: {roles: [mlp.down]}\n    method: lora\n    params: {r: 2}\n")
    code, out, _ = run(capsys, "plan", "tiny-llama", "--rules", str(rules))
    assert code == 0
    plan = surgery.plan(tiny.build("llama"), str(rules))
    lines = table_lines(out)
    for p in plan.placements:
        assert p.site.path in out
        assert any(line[0] == p.site.path and line[-1] == f"{p.trainable:,}" for line in lines)
    assert f"rule set 'mlp-down' from {rules}: {len(plan.placements)} placements" in out
    assert f"{plan.trainable:,}" in out.splitlines()[-1]


# ---- rules, plugins -----------------------------------------------------------------------------------------


def test_rules_lists_every_builtin_rule_set(capsys):
    code, out, _ = run(capsys, "rules", "--json")
    assert code == 0
    data = {r["name"]: r for r in json.loads(out)}
    known = builtin_rulesets()
    assert set(data) == set(known)
    for name, ruleset in known.items():
        assert data[name]["description"] == ruleset.description
        assert data[name]["methods"] == sorted({r.method for r in ruleset.rules})
    assert data["lora-qv"]["plugin"] == "builtin_rules"
    code, out, _ = run(capsys, "rules")
    assert code == 0 and all(name in out for name in known)
    code, out, _ = run(capsys, "rules", "--schema")
    assert code == 0 and json.loads(out) == json_schema()


def test_plugins_lists_methods_and_formats(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    data = {p["name"]: p for p in json.loads(out)}
    expected = {name: (methods, formats) for name, methods, formats in manager().plugins()}
    assert set(data) == set(expected)
    for name, (methods, formats) in expected.items():
        assert [m["name"] for m in data[name]["methods"]] == methods and data[name]["formats"] == formats
    lora = next(m for m in data["lora"]["methods"] if m["name"] == "lora")
    assert lora["mergeable"] is True and "r" in lora["params"]
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and all(name in out for name in expected)


# ---- merge --------------------------------------------------------------------------------------------------

needs_adapter_files = pytest.mark.skipif(not (hasattr(surgery, "save") and hasattr(surgery, "load")),
                                         reason="surgery.save/surgery.load are not there yet")


@needs_adapter_files
def test_merge_gives_the_adapted_models_logits(capsys, tmp_path, llama_dir, randomize_lora):
    from transformers import AutoModelForCausalLM

    adapted = AutoModelForCausalLM.from_pretrained(llama_dir)
    surgery.attach(adapted, "lora-qv", name="task")
    randomize_lora(adapted)
    surgery.save(adapted, tmp_path / "adapter", name="task")
    code, out, err = run(capsys, "merge", str(llama_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert "merging" not in err  # progress bars are drawn on a terminal only (tests/test_progress.py)
    assert "merged adapter 'task' (lora on 4 sites)" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    x = ids()
    with torch.no_grad():
        want, got = adapted(input_ids=x).logits, merged(input_ids=x).logits
        with surgery.disabled(adapted):
            base = adapted(input_ids=x).logits
    assert (want - base).abs().max() > 1e-3, "the adapter did not change the output"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "special_tokens_map.json").read_text() == "{}"


@needs_adapter_files
def test_merge_of_a_peft_adapter_matches_peft_merge_and_unload(capsys, tmp_path, llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if "peft" not in getattr(manager(), "adapter_formats", {}):
        pytest.skip("no plugin reads HF PEFT adapter directories")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    code, _, err = run(capsys, "merge", str(llama_dir), str(tmp_path / "peft"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    x = ids()
    with torch.no_grad():
        want = peft_model.merge_and_unload()(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_adapter_files
def test_merge_of_a_saved_classifier_keeps_its_class_and_head(capsys, tmp_path, randomize_lora):
    """A directory saved from a task model is rebuilt as the class its config names, head included."""
    from transformers import AutoConfig, BertForSequenceClassification

    config = AutoConfig.for_model("bert", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "base")
    surgery.attach(classifier, "lora-qv", name="task")
    randomize_lora(classifier)
    surgery.save(classifier, tmp_path / "adapter", name="task")
    code, _, err = run(capsys, "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    assert code == 0, err
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    x = ids(vocab=128)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, classifier(input_ids=x).logits, rtol=1e-5, atol=1e-5)


@needs_adapter_files
def test_an_adapter_that_does_not_fit_lists_one_mismatch_a_line(capsys, tmp_path, llama_dir):
    gpt2 = tiny.build("gpt2")
    surgery.attach(gpt2, "lora-qv", name="task")
    surgery.save(gpt2, tmp_path / "adapter", name="task")
    code, out, err = run(capsys, "merge", str(llama_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    lines = err.splitlines()  # the progress bar goes to stderr first
    start = next(i for i, line in enumerate(lines) if line.startswith("surgery: error: "))
    items = lines[start + 1:]
    assert code == 1 and out == "" and "does not fit" in lines[start]
    assert len(items) >= 2 and all(line.startswith("  - ") for line in items), err


def test_merge_refuses_a_non_empty_out_dir(capsys, tmp_path, llama_dir):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out, err = run(capsys, "merge", str(llama_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "out"))
    assert code == 1 and out == ""
    assert err.startswith("surgery: error: ") and "not an empty directory" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ---- errors and help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, code, says", [
    ([], 2, "required: COMMAND"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["inspect"], 2, "required: MODEL"),
    (["plan", "tiny-llama"], 2, "required: --rules"),
    (["inspect", "no/such/dir"], 1, "no/such/dir: no such model directory"),
    (["inspect", "tiny-nonesuch"], 1, "tiny-nonesuch: unknown tiny model (built in: tiny-llama"),
    (["inspect", "pyproject.toml"], 1, "pyproject.toml: is a file"),
    (["plan", "tiny-llama", "--rules", "no-such-rules"], 1, "no-such-rules: no rule file and no rule set"),
    (["merge", "tiny-llama", "no/such/adapter", "--out", "x"], 1, "no/such/adapter: no such adapter directory"),
])
def test_errors_are_one_line_with_an_exit_code(capsys, argv, code, says):
    got, out, err = run(capsys, *argv)
    assert got == code and out == ""
    assert err.startswith("surgery: error: ") and err.count("\n") == 1, err
    assert says in err


def test_a_bad_rule_file_names_the_file_rule_and_field(capsys, tmp_path):
    rules = tmp_path / "bad.yaml"
    rules.write_text("name: bad\nrules:\n  - select: {roles: [attention.query]}\n    method: lora\n    params: {r: 0}\n")
    code, _, err = run(capsys, "plan", "tiny-llama", "--rules", str(rules))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"surgery: error: {rules}, rule 0, field 'params.r': ")


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    def broken(model, *a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(surgery.cli.main.surgery, "inspect", broken)
    code, _, err = run(capsys, "inspect", "tiny-llama")
    assert code == 1 and err == "surgery: error: unexpected RuntimeError: boom second line (--debug shows the traceback)\n"
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", "tiny-llama", "--debug"])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: surgery {command}") and "--debug" in out


def test_installed_console_script_runs():
    exe = shutil.which("surgery")
    assert exe is not None, "the `surgery` console script is not installed: pip install -e ."
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(c in done.stdout for c in COMMANDS), done.stderr
