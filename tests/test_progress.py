"""Progress bars count real work: sites analysed, sites merged, adapter tensors saved and loaded; the CLI draws
them on a terminal only, never with --quiet, and redraws at most ten times a second."""
from __future__ import annotations

import io
import json

import pytest
from safetensors.torch import load_file

import surgery
from surgery import tiny
from surgery.cli import main as cli
from surgery.cli.output import TerminalBar, terminal_bar
from surgery.core import progress


class Recorder:
    """A reporter that keeps every task's description, unit and the (done, total) it was told, in order."""

    def __init__(self):
        self.tasks: list[dict] = []
        self.open: list[dict] = []

    def start(self, description, total, unit):
        self.open.append({"description": description, "unit": unit, "updates": [(0, total)]})
        self.tasks.append(self.open[-1])

    def update(self, done, total):
        self.open[-1]["updates"].append((done, total))

    def finish(self):
        self.open.pop()

    def named(self, description):
        return [t for t in self.tasks if t["description"] == description]


def _counted(task):
    """The task's final (done, total), after checking it counted up one unit at a time to its total (a count
    is told again when the total becomes known)."""
    counts = [d for d, _ in task["updates"]]
    assert counts == sorted(counts) and sorted(set(counts)) == list(range(counts[-1] + 1)), counts
    return task["updates"][-1]


def test_analysis_counts_every_site_it_reads():
    model, recorder = tiny.build("llama"), Recorder()
    with progress.reporting(recorder):
        report = surgery.inspect(model)
    (task,) = recorder.named("analysing")
    done, total = _counted(task)
    assert task["unit"] == "sites" and done == total == len(report.sites) + len(report.unknown) > 0


def test_merge_save_and_load_count_sites_and_tensors(tmp_path):
    model, recorder = tiny.build("gpt2"), Recorder()
    with progress.reporting(recorder):
        attachment = surgery.attach(model, "lora-all-linear", name="a")
        surgery.save(model, tmp_path / "a", name="a")
        surgery.merge(model, "a")
        surgery.unmerge(model, "a")
        surgery.detach(model, "a")
        surgery.load(model, tmp_path / "a")
    tensors = len(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert tensors == 2 * len(attachment.plan.placements)  # lora_A and lora_B per whole-module site
    (merging,) = recorder.named("merging")
    assert _counted(merging) == (len(attachment.plan.placements),) * 2
    (saving,) = recorder.named("saving adapter")
    (loading,) = recorder.named("loading adapter")
    assert _counted(saving) == _counted(loading) == (tensors, tensors)
    assert not recorder.open


def test_no_reporter_means_no_output_and_a_plain_counter(capsys):
    with progress.task("x", 3, "things") as bar:
        for _ in range(3):
            bar.advance()
    assert (bar.done, bar.total) == (3, 3)
    assert capsys.readouterr() == ("", "")


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bar_draws_counts_and_redraws_at_most_every_interval():
    now = [0.0]
    stream = Tty()
    bar = TerminalBar(stream, width=10, interval=0.1, clock=lambda: now[0])
    with progress.reporting(bar), progress.task("merging", 1000, "sites") as task:
        for i in range(1000):
            now[0] = i * 0.001  # one second in all: about ten redraws, not a thousand
            task.advance()
    frames = stream.getvalue().split("\r")[1:]
    assert 10 <= len(frames) <= 14
    assert frames[-1].startswith("merging") and "[##########] 1000/1000 sites" in frames[-1]
    assert stream.getvalue().endswith("\n")


def test_nested_tasks_show_their_parents():
    stream = Tty()
    with progress.reporting(TerminalBar(stream)), progress.task("loading", 1), progress.task("analysing", 2, "sites") as t:
        t.advance()
        t.advance()
    assert "loading > analysing" in stream.getvalue() and "2/2 sites" in stream.getvalue()


def test_terminal_bar_only_on_a_terminal_and_never_quiet():
    assert terminal_bar(False, Tty()) is not None
    assert terminal_bar(True, Tty()) is None
    assert terminal_bar(False, io.StringIO()) is None


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_bar_on_a_terminal_stderr(monkeypatch, capsys, quiet):
    stderr = Tty()
    monkeypatch.setattr("sys.stderr", stderr)
    assert cli.main(["inspect", "tiny-llama", "--json"] + (["--quiet"] if quiet else [])) == 0
    drawn = stderr.getvalue()
    assert ("analysing" in drawn) != quiet
    if not quiet:  # the final frame counts every site the JSON lists
        data = json.loads(capsys.readouterr().out)
        n = len(data["sites"]) + len(data["unknown"])
        assert f"{n}/{n} sites" in drawn
