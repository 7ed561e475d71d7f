"""Saving and loading under a careful and a hostile user (issue 22): the save writes only the adapter's own files,
each atomically, the config last, under the directory's lock; names in files are checked."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import surgery
import surgery.io.atomic
from surgery import tiny
from surgery.errors import AdapterFileError
from tests.fingerprint import assert_unchanged, fingerprint

ROOT = Path(__file__).resolve().parent.parent


def randomize(model, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


@pytest.mark.parametrize("bad", ["x.y", "../../x", ""])
def test_bad_names_in_an_adapter_file_are_refused(tmp_path, bad):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    directory = surgery.save(model, tmp_path / "ad", name="a")
    config = json.loads((directory / "surgery_adapter.json").read_text())
    config["name"] = bad
    (directory / "surgery_adapter.json").write_text(json.dumps(config))
    fresh = tiny.build("llama")
    before = fingerprint(fresh)
    with pytest.raises(AdapterFileError, match="field 'name'"):
        surgery.load(fresh, directory)
    assert_unchanged(fresh, before)
    with pytest.raises(AdapterFileError, match="field 'name'"):  # a malformed file stays refused, whatever the caller names
        surgery.load(fresh, directory, name="chosen")


def test_save_leaves_the_rest_of_the_directory_alone(tmp_path, monkeypatch):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, 0o755)
    log = open(directory / "train.log", "a")
    log.write("before\n")
    log.flush()
    (directory / "notes").mkdir()
    inode, parent = directory.stat().st_ino, sorted(p.name for p in tmp_path.iterdir())
    surgery.save(model, directory, name="a")
    surgery.save(model, directory, name="a", format="peft")
    log.write("after\n")  # still the same file: nothing was copied or swapped
    log.close()
    assert (directory / "train.log").read_text() == "before\nafter\n"
    assert directory.stat().st_ino == inode and stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == parent  # no staging beside it
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors", "notes", "surgery_adapter.json",
                                                           "surgery_manifest.json", "train.log"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((directory / "surgery_adapter.json").stat().st_mode) == 0o666 & ~umask
    monkeypatch.chdir(directory)
    surgery.save(model, ".", name="a")  # into the working directory: it stays where it is
    assert Path.cwd().samefile(directory) and (directory / "train.log").exists()


def test_a_save_cut_between_its_renames_is_refused_clearly_on_load(tmp_path, monkeypatch):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    directory = surgery.save(model, tmp_path / "ad", name="a")
    randomize(model, std=0.5)
    real = os.replace

    def cut(src, dst):
        if str(dst).endswith("surgery_adapter.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(surgery.io.atomic.os, "replace", cut)
    with pytest.raises(AdapterFileError, match="No space left on device"):
        surgery.save(model, directory, name="a")
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_model.safetensors", "surgery_adapter.json"]
    with pytest.raises(AdapterFileError, match="do not match the SHA-256"):
        surgery.load(tiny.build("llama"), directory)
    surgery.save(model, directory, name="a")
    surgery.load(tiny.build("llama"), directory)


def test_save_refuses_a_directory_that_is_a_file(tmp_path):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    (tmp_path / "file").write_text("x")
    started = time.monotonic()
    with pytest.raises(AdapterFileError, match="cannot create the adapter directory|not a directory"):
        surgery.save(model, tmp_path / "file", name="a")
    assert time.monotonic() - started < 5



SAVER = """
import sys, torch, surgery
from surgery import tiny
model = tiny.build("llama")
surgery.attach(model, "lora-qv", name="a")
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.fill_(float(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    surgery.save(model, sys.argv[1], name="a")
print("ok")
"""


def test_two_processes_saving_to_one_directory_leave_a_loadable_adapter(tmp_path):
    directory = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(directory), value, "15"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for value in ("0.25", "0.5")]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
    model = tiny.build("llama")
    surgery.load(model, directory)
    values = {float(p.detach().flatten()[0]) for p in model.parameters() if p.requires_grad}
    assert values in ({0.25}, {0.5})  # one save's files, never a mix
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_model.safetensors", "surgery_adapter.json"]
