"""Rule files: schema, errors that name the file/rule/field, matching, overrides, built-in rule sets."""
import json

import pytest

import surgery
from surgery import tiny
from surgery.errors import RuleFileError
from surgery.rules.schema import builtin_rulesets, json_schema, read_ruleset


def write(tmp_path, text, name="rules.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_rule_sets_are_valid():
    names = set(builtin_rulesets())
    assert {"lora-qv", "lora-attention", "lora-all-linear"} <= names
    for ruleset in builtin_rulesets().values():
        assert ruleset.description


def test_json_schema_exported():
    schema = json_schema()
    assert schema["title"] == "RuleSet"
    json.dumps(schema)
    assert "Selector" in schema["$defs"]


@pytest.mark.parametrize("text, message", [
    ("name: x\nrules:\n  - select: {roles: [attention.qurey]}\n    method: lora\n", r"rule 0, field 'select.roles.0'"),
    ("name: x\nrules:\n  - select: {kinds: [linear]}\n    method: lora\n  - select: {}\n    method: lora\n",
     r"rule 1, field 'select': .*at least one of"),
    ("name: x\nrules:\n  - select: {kinds: [linear]}\n    method: lora\n    parms: {}\n", r"rule 0, field 'parms': Extra inputs"),
    ("name: x\nrules: []\n", r"field 'rules'"),
    ("rules:\n  - select: {kinds: [linear]}\n    method: lora\n", r"field 'name': Field required"),
    ("name: x\nrules: [\n", r"not valid YAML"),
    ("- just a list\n", r"must be a mapping"),
])
def test_bad_rule_files_name_file_rule_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RuleFileError, match=message) as err:
        read_ruleset(path)
    assert str(path) in str(err.value)


def test_method_params_are_validated_by_the_method(tmp_path):
    path = write(tmp_path, "name: x\nrules:\n  - select: {kinds: [linear]}\n    method: lora\n    params: {r: 0}\n")
    with pytest.raises(RuleFileError, match=r"rule 0, field 'params.r': Input should be greater than 0"):
        surgery.plan(tiny.build("llama"), path)
    path = write(tmp_path, "name: x\nrules:\n  - select: {kinds: [linear]}\n    method: lora\n    params: {rank: 4}\n")
    with pytest.raises(RuleFileError, match=r"field 'params.rank': Extra inputs"):
        surgery.plan(tiny.build("llama"), path)


def test_rule_matching_nothing_says_so(tmp_path):
    text = "name: x\nrules:\n  - select: {paths: ['*.nothing_here']}\n    method: lora\n"
    with pytest.raises(RuleFileError, match=r"rule 0: matches no site"):
        surgery.plan(tiny.build("llama"), write(tmp_path, text))
    optional = text + "    optional: true\n  - select: {roles: [attention.query]}\n    method: lora\n"
    plan = surgery.plan(tiny.build("llama"), write(tmp_path, optional))
    assert len(plan.placements) == 2


def test_kind_not_accepted_by_method(tmp_path):
    text = "name: x\nrules:\n  - select: {roles: [embedding.input]}\n    method: out_scale_missing\n"
    with pytest.raises(RuleFileError, match="no plugin provides"):
        surgery.plan(tiny.build("llama"), write(tmp_path, text))


def test_selectors_paths_classes_and_exclude():
    model = tiny.build("llama")
    ruleset = surgery.RuleSet(name="t", rules=[surgery.Rule(
        select=surgery.Selector(classes=["Linear"], paths=["model.layers.*"]),
        exclude=surgery.Selector(roles=["mlp.gate", "mlp.up"], paths=["model.layers.1.*"]), method="lora")])
    paths = {p.site.path for p in surgery.plan(model, ruleset).placements}
    assert "model.layers.0.mlp.gate_proj" in paths and "model.layers.1.mlp.gate_proj" not in paths
    assert "model.layers.1.mlp.down_proj" in paths and "lm_head" not in paths
    assert len(paths) == 7 + 5


def test_conflicting_rules_on_one_site(tmp_path):
    text = ("name: x\nrules:\n  - select: {roles: [attention.query]}\n    method: lora\n    params: {r: 4}\n"
            "  - select: {paths: ['*.q_proj']}\n    method: lora\n    params: {r: 8}\n")
    with pytest.raises(RuleFileError, match=r"rule 1: puts 'lora' on 'model.layers.0.self_attn.q_proj' with other params than rule 0"):
        surgery.plan(tiny.build("llama"), write(tmp_path, text))


def test_role_override_declares_slices(tmp_path):
    # declare q/v slices on a plain linear by path, as one would for an architecture the inference cannot read
    text = ("name: x\nroles:\n  - {path: 'model.layers.*.mlp.up_proj', role: attention.query, slices: [[0, 32]]}\n"
            "rules:\n  - select: {roles: [attention.query], paths: ['*.up_proj']}\n    method: lora\n    params: {r: 2}\n")
    plan = surgery.plan(tiny.build("llama"), write(tmp_path, text))
    assert [p.site.path for p in plan.placements] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert plan.placements[0].site.slices["attention.query"] == ((0, 32),)
    assert plan.placements[0].trainable == 2 * (64 + 32)
    bad = text.replace("[[0, 32]]", "[[0, 999]]")
    with pytest.raises(RuleFileError, match="exceeds the 96 output features"):
        surgery.plan(tiny.build("llama"), write(tmp_path, bad))
    missing = text.replace("model.layers.*.mlp.up_proj", "nowhere.*")
    with pytest.raises(RuleFileError, match="role override 0: path 'nowhere.*' matches no"):
        surgery.plan(tiny.build("llama"), write(tmp_path, missing))


def test_plan_table_and_counts():
    model = tiny.build("llama")
    plan = surgery.plan(model, "lora-qv")
    # q: 64 -> 64, v: 64 -> 32 (2 kv heads x 16), r = 8, 2 layers
    assert plan.trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    text = str(plan)
    assert "model.layers.0.self_attn.q_proj" in text and "lora" in text and f"{plan.trainable:,}" in text


def test_shipped_json_schema_is_current():
    from pathlib import Path

    shipped = json.loads((Path(__file__).parent.parent / "rules" / "rule-file.schema.json").read_text())
    assert shipped == json_schema(), "regenerate with: python -c \"from surgery.rules.schema import dump_schema; dump_schema('rules/rule-file.schema.json')\""
