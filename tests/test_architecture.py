"""The framework's shape: the built-in plugins use only the public plugin API, the engine's imports run one way
through its layers with no cycle, every hook is called through pluggy, and pluggy's ordering lets a third-party
plugin override a built-in."""
from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
import surgery.core.registry
import surgery.plugin
from surgery import tiny
from surgery.errors import RuleFileError

ROOT = Path(__file__).resolve().parent.parent
ENGINE, PLUGINS = ROOT / "surgery", ROOT / "plugins"

# Layers from the bottom up: a module may import its own layer and those below it, never one above.
LAYERS = [
    ("surgery.errors", "surgery.core"),
    ("surgery.analysis",),
    ("surgery.rules",),
    ("surgery.engine",),
    ("surgery.io",),
    ("surgery.plugin", "surgery.tiny", "surgery.cli", "surgery"),  # the facades and the command line
]


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, at any depth (inside functions too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def engine_graph() -> dict[str, set[str]]:
    """Module -> the engine modules it imports (only modules that exist in surgery/)."""
    modules = {module_name(p, ENGINE, "surgery"): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_engine_modules():
    graph = engine_graph()
    assert len(graph) > 30, "the engine's modules were not found"
    assert cycles(graph) == []


def test_imports_run_one_way_through_the_layers():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in engine_graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert upward == []


def test_the_contracts_import_nothing_else_of_the_engine():
    for module, targets in engine_graph().items():
        if module.startswith("surgery.core"):
            assert {t for t in targets if not t.startswith("surgery.core")} <= {"surgery.errors"}, module


def plugin_files() -> list[Path]:
    files = sorted(PLUGINS.rglob("*.py"))
    assert len(files) > 10
    return files


def test_builtin_plugins_import_only_the_public_api():
    allowed = {"surgery", "surgery.plugin"}
    bad = []
    for path in plugin_files():
        name = module_name(path, PLUGINS, "surgery_plugins")
        for module in imports(path, name):
            top = module.split(".")[0]
            if top == "surgery" and module not in allowed and not module.startswith("surgery.plugin."):
                # `from surgery import x` adds `surgery.x`: fine when x is a public name, not a module
                head, _, leaf = module.rpartition(".")
                if head in allowed and (leaf in surgery.__all__ or leaf in surgery.plugin.__all__):
                    continue
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert bad == []


def test_builtin_plugins_use_only_public_names_of_surgery():
    """`surgery.X` and `plugin.X` attribute reads name public API only."""
    public = {"surgery": set(surgery.__all__) | {"plugin"}, "plugin": set(surgery.plugin.__all__)}
    bad = []
    for path in plugin_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in public:
                if node.attr not in public[node.value.id]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert bad == []


def private_engine_attributes() -> set[str]:
    """Names of the engine's private attributes and functions (`_name`), which no plugin may touch."""
    names = set()
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                names.add(node.name)
    return names


def test_builtin_plugins_touch_no_private_engine_state():
    # torch's and transformers' own private names that the engine happens to use too are not the engine's state
    foreign = {"_modules", "_parameters", "_buffers", "_attn_implementation", "_global_mapping", "_orig_mod", "_C",
               "_version"}
    private = private_engine_attributes() - foreign
    bad = []
    for path in plugin_files():
        own = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and node.attr not in own:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert bad == []


def test_the_plugin_api_is_documented():
    for name in surgery.plugin.__all__:
        obj = getattr(surgery.plugin, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"surgery.plugin.{name} has no docstring"
        else:  # constants: described in the module they come from
            assert obj is not None
    for name in ("surgery_methods", "surgery_weight_formats", "surgery_adapter_formats", "surgery_rule_dirs"):
        doc = getattr(surgery.core.hookspecs, name).__doc__
        assert "Returns" in doc and "Called" in doc, f"hook {name}: the manual says what it returns and when it runs"


def test_every_hook_is_called_through_pm_hook():
    """No module reads a hook implementation's function to call it (that skips pluggy's ordering and wrappers)."""
    bad = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in ENGINE.rglob("*.py")
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and node.attr == "function"]
    assert bad == []


# ---- pluggy's ordering and wrappers take effect -----------------------------------------------------------------


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(surgery.core.registry, "_REGISTRY", None)
    yield surgery.core.registry.manager()


def _rule_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "mine.yaml").write_text(
        "name: lora-qv\ndescription: only the query, rank 2\nrules:\n"
        "  - select: {roles: [attention.query]}\n    method: lora\n    params: {r: 2}\n")
    return directory


@pytest.mark.parametrize("order", ["tryfirst", "plain"])
def test_a_rule_set_of_the_same_name_overrides_a_builtin_only_by_pluggys_ordering(tmp_path, fresh_registry, order):
    directory = _rule_dir(tmp_path)

    class Override:
        @surgery.hookimpl(tryfirst=order == "tryfirst")
        def surgery_rule_dirs(self):
            return [directory]

    surgery.register_plugin(Override(), name="override")
    model = tiny.build("llama")
    if order == "plain":  # no ordering asked for: a clash stays an error naming both files
        with pytest.raises(RuleFileError, match="lora-qv.*also declared by"):
            surgery.plan(model, "lora-qv")
        return
    plan = surgery.plan(model, "lora-qv")
    assert {p.site.path for p in plan.placements} == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert {p.params.r for p in plan.placements} == {2}


class _MyLinear:
    """A weight format for nn.Linear, as a third party might write to take over plain linears."""

    name, kind, priority, is_view = "my-linear", "linear", 0, True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dense(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.weight.detach().copy_(weight)

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight.detach().clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        module.weight.detach().copy_(saved["weight"])


@pytest.mark.parametrize("order,winner", [("tryfirst", "my-linear"), ("trylast", "linear")])
def test_a_weight_format_overrides_a_builtin_by_pluggys_ordering(fresh_registry, order, winner):
    class Formats:
        @surgery.hookimpl(**{order: True})
        def surgery_weight_formats(self):
            return [_MyLinear()]

    surgery.register_plugin(Formats(), name="formats")
    assert fresh_registry.format_of(nn.Linear(3, 2)).name == winner


def test_a_hook_wrapper_sees_and_changes_what_the_plugins_return(fresh_registry):
    class HideIa3:
        @surgery.hookimpl(wrapper=True)
        def surgery_methods(self):
            results = yield
            return [[m for m in result if m.name != "ia3"] for result in results]

    assert "ia3" in fresh_registry.methods
    surgery.register_plugin(HideIa3(), name="hide-ia3")
    assert "ia3" not in fresh_registry.methods and "lora" in fresh_registry.methods


def test_plugins_listing_names_who_gives_what(fresh_registry):
    listing = {name: (methods, formats) for name, methods, formats in fresh_registry.plugins()}
    assert "lora" in listing["lora"][0] and "linear" in listing["dense_formats"][1]
    assert sys.modules["surgery_plugins.dense_formats"] is fresh_registry.pm.get_plugin("dense_formats")
