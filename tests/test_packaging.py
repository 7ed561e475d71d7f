"""`pip install .` (not -e) gives everything the README uses: the built wheel holds every package of the
source tree, the built-in rule sets and the rule-file JSON schema, and the modules its entry points name."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"surgery": ROOT / "surgery", "surgery_plugins": ROOT / "plugins", "surgery_rules": ROOT / "rules"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The file names in a wheel built from a copy of the project (the source tree gets no build/ folder)."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in PACKAGES.values():
        shutil.copytree(folder, src / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("surgery-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    return set(wheel.namelist())


def _source_files(pattern: str) -> set[str]:
    """Wheel names of the project's files matching `pattern`, under each package's installed name."""
    return {f"{package}/{path.relative_to(folder).as_posix()}" for package, folder in PACKAGES.items()
            for path in folder.rglob(pattern) if "__pycache__" not in path.parts}


def test_wheel_holds_every_module_of_the_source_tree(wheel_names):
    missing = _source_files("*.py") - wheel_names
    assert not missing, f"modules left out of the wheel (add their package to [tool.setuptools]): {sorted(missing)}"


def test_wheel_holds_the_rule_sets_and_the_schema(wheel_names):
    data = _source_files("*.yaml") | _source_files("*.json")
    assert "surgery_rules/rule-file.schema.json" in data and "surgery_rules/lora-qv.yaml" in data
    assert not data - wheel_names, f"rule files left out of the wheel: {sorted(data - wheel_names)}"


def test_wheel_entry_points_name_modules_it_holds(wheel, wheel_names):
    (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    targets = {value.split(":")[0] for section in ("surgery", "console_scripts") for value in parser[section].values()}
    assert "surgery.cli.main" in targets and "surgery_plugins.builtin_rules" in targets
    for module in targets:
        path = module.replace(".", "/")
        assert f"{path}.py" in wheel_names or f"{path}/__init__.py" in wheel_names, module
