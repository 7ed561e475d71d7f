"""Plugins: the built-ins load through entry points, and a third-party package installed with pip is found."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
import surgery.core.registry
from surgery import tiny
from surgery.errors import PluginError, RuleFileError
from tests.conftest import assert_bit_identical, ids, snapshot

PLUGIN_SRC = Path(__file__).parent / "plugin_pkg"


def test_builtins_come_from_entry_points():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="surgery")}
    assert {"surgery_plugins.lora.plugin", "surgery_plugins.dense_formats", "surgery_plugins.builtin_rules"} <= names
    registry = surgery.core.registry.Registry()
    assert "lora" in registry.methods
    assert {"linear", "conv1d", "embedding"} <= {f.name for f in registry.formats}


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN_SRC)], check=True)
    sys.path.insert(0, str(target))
    import importlib

    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("surgery_scale_plugin")]:
        del sys.modules[name]


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(surgery.core.registry, "_REGISTRY", None)
    yield
    # monkeypatch restores the process-wide registry


def test_third_party_plugin_package(installed_plugin, fresh_registry):
    registry = surgery.core.registry.manager()
    assert "out_scale" in registry.methods, "entry point of the installed package was not loaded"
    model = tiny.build("llama")
    before, x = snapshot(model), ids()
    reference = model(x).logits
    plan = surgery.plan(model, "out-scale-mlp")
    assert {p.site.path for p in plan.placements} == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    surgery.attach(model, "out-scale-mlp", name="s")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.branches["s"].factor.mul_(1.5)
    adapted = model(x).logits
    assert not torch.allclose(adapted, reference)
    surgery.merge(model, "s")
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
    surgery.detach(model, "s")
    assert_bit_identical(model, before)
    assert torch.equal(model(x).logits, reference)


def test_duplicate_method_names_are_refused():
    class Clash:
        @surgery.hookimpl
        def surgery_methods(self):
            from surgery_plugins.lora import Lora

            return [Lora()]

    registry = surgery.core.registry.Registry()
    registry.register(Clash(), name="clash")
    with pytest.raises(PluginError, match="'lora' is provided by both"):
        registry.methods


def test_unknown_method_names_the_rule(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nrules:\n  - select: {kinds: [linear]}\n    method: nosuch\n")
    with pytest.raises(RuleFileError, match=r"bad.yaml, rule 0, field 'method': no plugin provides method 'nosuch'"):
        surgery.plan(tiny.build("llama"), path)
