"""What issue 20 added to the plugin API: `Method.narrow` (checked by the planner), `AttentionInfo.hidden_size`,
and the `surgery_peft_mappings` hook (one mapping per PEFT type and per method; a plugin's mapping is used by the
`peft` adapter format)."""
import json

import pytest
import torch

import surgery
import surgery.core.registry
from surgery import plugin, tiny
from surgery.errors import AdapterFileError, PluginError, RuleFileError, SurgeryError


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(surgery.core.registry, "_REGISTRY", None)
    yield surgery.core.registry.manager()


class Picky(plugin.Method):
    """An IA3-like method whose narrow() is given by the test."""

    name, params, kinds = "picky", plugin.MethodParams, frozenset({"linear"})

    def __init__(self, narrow):
        self._narrow = narrow

    def narrow(self, sites, params):
        return self._narrow(sites)

    def count(self, site, params, roles):
        return 1


def _plan(fresh_registry, narrow):
    class Plugin:
        @surgery.hookimpl
        def surgery_methods(self):
            return [Picky(narrow)]

    surgery.register_plugin(Plugin(), name="picky")
    rules = surgery.RuleSet(name="p", rules=[surgery.Rule(select=surgery.Selector(roles=["attention.value"]), method="picky")])
    return surgery.plan(tiny.build("llama"), rules)


def test_narrow_keeps_a_subset_in_order(fresh_registry):
    plan = _plan(fresh_registry, lambda sites: sites[1:])
    assert [p.site.path for p in plan.placements] == ["model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("narrow", [lambda sites: sites[::-1], lambda sites: sites + sites[:1]])
def test_narrow_returning_other_sites_is_a_plugin_error(fresh_registry, narrow):
    with pytest.raises(PluginError, match="narrow\\(\\) must return a subset of the sites it is given, in order"):
        _plan(fresh_registry, narrow)


def test_narrow_refusing_names_the_rule(fresh_registry):
    def refuse(sites):
        raise SurgeryError("too few")
    with pytest.raises(RuleFileError, match="rule 0, field 'params': too few"):
        _plan(fresh_registry, refuse)


def test_attention_sites_carry_the_width_their_key_projection_reads():
    for arch, width in [("llama", 64), ("gpt2", 64), ("t5", 64)]:
        sites = [s for s in surgery.inspect(tiny.build(arch)).sites if s.kind == "attention"]
        assert sites and {s.attention.hidden_size for s in sites} == {width}


class _Mapping:
    def __init__(self, peft_type, methods):
        self.peft_type, self.methods = peft_type, frozenset(methods)

    def read(self, config, tensors, report, source):
        values = [s for s in report.sites if "attention.value" in s.roles]
        return ([{"select": {"roles": ["attention.value"]}, "method": "ia3"}],
                {f"{s.path}.ia3_l": torch.full((s.out_features,), 2.0) for s in values})

    def write(self, model, attachment):
        raise SurgeryError("not written")


@pytest.mark.parametrize("peft_type, methods", [("LORA", ["ia3"]), ("IA3", ["lora"])])
def test_one_mapping_per_peft_type_and_per_method(fresh_registry, peft_type, methods):
    class Plugin:
        @surgery.hookimpl
        def surgery_peft_mappings(self):
            return [_Mapping(peft_type, methods)]

    surgery.register_plugin(Plugin(), name="mapping")
    with pytest.raises(PluginError, match="mapped by more than one mapping.*'mapping'"):
        plugin.peft_mappings()


def test_a_plugins_mapping_is_what_the_peft_format_reads_with(fresh_registry, tmp_path):
    class Plugin:
        @surgery.hookimpl
        def surgery_peft_mappings(self):
            return [_Mapping("IA3", ["ia3"])]

    surgery.register_plugin(Plugin(), name="mapping")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    from safetensors.torch import save_file
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    model = tiny.build("llama")
    attachment = surgery.load(model, tmp_path, name="x")
    assert {p.method for p in attachment.plan.placements} == {"ia3"}
    assert attachment.plan.ruleset.name == "peft-ia3"
    assert all(torch.equal(b.ia3_l, torch.full_like(b.ia3_l, 2.0)) for b in attachment.branches.values())
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE"}))
    with pytest.raises(AdapterFileError, match="peft_type 'BONE' cannot be mapped \\(mapped: .*IA3.*LORA"):
        surgery.load(tiny.build("llama"), tmp_path)
    with pytest.raises(SurgeryError, match="not written"):
        surgery.save(model, tmp_path / "out", name="x", format="peft")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_new_branch_takes_the_mode_of_the_model_it_is_attached_to(mode):
    model = tiny.build("llama").train(mode == "train")
    surgery.attach(model, "lora-qv", name="a")
    modules = list(model.modules())
    assert {m.training for m in modules} == {mode == "train"}
