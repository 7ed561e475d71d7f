"""A property-based state machine (hypothesis) over every pass: attach, detach, merge and unmerge (exact and not),
set_active, disabled, combine, bake, save + load (surgery's format and PEFT's), per_sample, optimizer steps and
changes to an attachment's tensors, on llama, gpt2, bert and t5, in float32 and bfloat16, with and without
pruned weights (zeros of both signs). After every step:

- the ledger is consistent and `active()` is what runs: every Host runs exactly the active, unmerged branches,
  and every merged attachment counts as active;
- a pass that raised changed nothing (tensor bits, module objects, hooks, flags, the ledger);
- merge, unmerge and bake keep the outputs within the dtype's tolerance; with nothing active the model computes
  exactly what the base model computes;
- after the last detach the model holds its original module objects, hooks and flags, and its original tensor
  bits (unless an inexact merge or a bake changed the base weights on purpose: then the new bits are the base).

Any pass may also run with a fault injected at its k-th step (the `fault` rule, with test_faults' injector): if the
fault fires, nothing may have changed.

Each of the 16 configurations is a test of its own, run for `SURGERY_SM_EXAMPLES` sequences of up to
`SURGERY_SM_STEPS` steps (CI: 3 x 30, derandomized). The long run (`SURGERY_LONG=1`: 4 random sequences of up to
50 steps per configuration, about 10 minutes on 2 cores), with the figures printed: `SURGERY_LONG=1
SURGERY_SM_REPORT=1 python -m pytest tests/test_faults.py tests/test_hostile.py tests/test_state_machine.py -q -s`
(`SURGERY_SM_REPORT_FILE=path` rewrites them there after every sequence; `SURGERY_SM_NO_SHRINK=1` skips
shrinking a failure).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import surgery
from surgery import tiny
from surgery.engine.host import Host
from surgery.errors import SurgeryError
from tests.conftest import ids, logits
from tests.fingerprint import assert_unchanged, fingerprint, same_bits
from tests.test_faults import Faults, InjectedFault, inject, unwrap_undos

LONG = os.environ.get("SURGERY_LONG", "") not in ("", "0")
EXAMPLES = int(os.environ.get("SURGERY_SM_EXAMPLES", "4" if LONG else "3"))  # per configuration
STEPS = int(os.environ.get("SURGERY_SM_STEPS", "50" if LONG else "30"))
RANDOM = LONG or os.environ.get("SURGERY_SM_RANDOM", "") not in ("", "0")

CONFIGS = [(arch, dtype, pruned) for arch in ("llama", "gpt2", "bert", "t5")
           for dtype in (torch.float32, torch.bfloat16) for pruned in (False, True)]
NAMES = ("a", "b", "c")
REPORT_FILE = os.environ.get("SURGERY_SM_REPORT_FILE")  # the figures so far, rewritten after every sequence


def _prompt() -> surgery.RuleSet:
    return surgery.RuleSet(name="prompt", rules=[surgery.Rule(
        select=surgery.Selector(roles=["embedding.input"]), exclude=surgery.Selector(paths=["decoder.*"]),
        method="prompt-tuning", params={"num_virtual_tokens": 2})])


def _lora_r4() -> surgery.RuleSet:
    return surgery.RuleSet(name="lora-r4", rules=[surgery.Rule(
        select=surgery.Selector(roles=["attention.query", "attention.value"]), method="lora", params={"r": 4, "alpha": 8})])


RULES = {"lora-qv": "lora-qv", "lora-all": "lora-all-linear", "lora-r4": _lora_r4(), "ia3": "ia3",
         "houlsby": "adapter-houlsby", "parallel": "adapter-parallel", "prefix": "prefix", "prompt": _prompt(),
         "loha": "loha", "lokr": "lokr", "oft": "oft", "llama-adapter": "llama-adapter"}
if "vera" in surgery.plugin.manager().methods:  # the separate surgery-vera package, when installed (CI installs it)
    RULES["vera"] = "vera"
LORA = {"lora-qv", "lora-all", "lora-r4"}
STATS: Counter = Counter()


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 6e-2


class SurgeryMachine(RuleBasedStateMachine):
    """One model, the passes in random order, the invariants after every step."""

    configs = CONFIGS

    @initialize(data=st.data(), seed=st.integers(0, 3))
    def build(self, data, seed):
        self.arch, self.dtype, pruned = data.draw(st.sampled_from(type(self).configs))
        self.model = tiny.build(self.arch, dtype=self.dtype, seed=seed)
        if pruned:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.dim() == 2:
                        mask = torch.rand(p.shape, generator=g) < 0.25
                        signs = torch.where(torch.rand(p.shape, generator=g) < 0.5, -0.0, 0.0).to(p.dtype)
                        p[mask] = signs[mask]
        self.x = ids(batch=2, seq=6, seed=seed + 1)
        self.original = fingerprint(self.model)
        self.base_bits = dict(self.original.tensors)
        self.base_logits = self.out()
        self.rules: dict[str, str] = {}  # attachment name -> its RULES key
        self.changed_while_merged: set[str] = set()
        self.base_changed = False  # an inexact unmerge or a bake changed the base weights on purpose
        self.tmp = Path(tempfile.mkdtemp(prefix="surgery-sm-"))
        STATS["examples"] += 1
        STATS[f"config {self.arch} {str(self.dtype)[6:]}{' pruned' if pruned else ''}"] += 1

    def teardown(self):
        import shutil

        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if REPORT_FILE:
            Path(REPORT_FILE).write_text(json.dumps(dict(sorted(STATS.items())), indent=1))

    # ---- helpers ----------------------------------------------------------------------------------------------
    def out(self, model=None) -> torch.Tensor:
        with torch.no_grad():
            return logits(model or self.model, self.x).float()

    def close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape:
            return False
        return bool((a - b).abs().max() <= _tolerance(self.dtype) * (1 + b.abs().max()))

    def ledger(self):
        return self.model.__dict__.get("_surgery_ledger")

    def attached(self) -> bool:
        return self.ledger() is not None

    def pick(self, data, allow_none: bool = False):
        """Mostly a name that is attached, sometimes any name (or None): refusals are steps too."""
        names = list(self.rules)
        others = st.sampled_from(NAMES + ((None,) if allow_none else ()))
        return data.draw(st.one_of(st.sampled_from(names), others) if names else others)

    def merged(self) -> list[str]:
        ledger = self.ledger()
        return list(ledger.merge_order) if ledger else []

    def attempt(self, step: str, do) -> bool:
        """Run a pass; if it raises a SurgeryError, nothing may have changed."""
        STATS[f"step {step}"] += 1
        before = fingerprint(self.model)
        try:
            do()
        except SurgeryError as err:
            assert_unchanged(self.model, before, f"{step} raised {type(err).__name__}: {err}")
            STATS[f"refused {step}"] += 1
            return False
        return True

    def keeps_outputs(self, step: str, reference: torch.Tensor) -> None:
        now = self.out()
        assert self.close(now, reference), f"{step} moved the outputs by {(now - reference).abs().max():.3g}"

    # ---- the passes -------------------------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES + ("x.y",)), rules=st.sampled_from(sorted(RULES)))
    def attach(self, name, rules):
        if self.attempt("attach", lambda: surgery.attach(self.model, RULES[rules], name=name)):
            self.rules[name] = rules

    @precondition(attached)
    @rule(data=st.data())
    def detach(self, data):
        name = self.pick(data)
        merged = name in self.merged() and not self.ledger().attachments[name].exact
        if self.attempt("detach", lambda: surgery.detach(self.model, name)):
            self.rules.pop(name, None)
            self.changed_while_merged.discard(name)
            self.base_changed |= merged

    @precondition(attached)
    @rule(data=st.data(), exact=st.booleans())
    def merge(self, data, exact):
        name = self.pick(data)
        was_active = name in surgery.active(self.model)
        reference = self.out()
        if self.attempt("merge", lambda: surgery.merge(self.model, name, exact=exact)) and was_active:
            self.keeps_outputs("merge", reference)

    @precondition(attached)
    @rule(data=st.data())
    def unmerge(self, data):
        name = self.pick(data)
        ledger = self.ledger()
        inexact = ledger is not None and name in ledger.attachments and not ledger.attachments[name].exact
        reference = self.out()
        if self.attempt("unmerge", lambda: surgery.unmerge(self.model, name)):
            self.base_changed |= inexact
            if name not in self.changed_while_merged:
                self.keeps_outputs("unmerge", reference)
            self.changed_while_merged.discard(name)

    @precondition(attached)
    @rule(data=st.data())
    def bake(self, data):
        name = self.pick(data)
        was_active = name in surgery.active(self.model)
        reference = self.out()
        if self.attempt("bake", lambda: surgery.bake(self.model, name)):
            self.rules.pop(name, None)
            self.changed_while_merged.discard(name)
            self.base_changed = True
            if was_active:
                self.keeps_outputs("bake", reference)

    @precondition(attached)
    @rule(data=st.data())
    def set_active(self, data):
        names = list(dict.fromkeys(self.pick(data) for _ in range(data.draw(st.integers(0, 3)))))
        self.attempt("set_active", lambda: surgery.set_active(self.model, names))

    @precondition(attached)
    @rule()
    def disabled(self):
        before = fingerprint(self.model)
        STATS["step disabled"] += 1
        try:
            with surgery.disabled(self.model):
                assert torch.equal(self.out(), self.base_logits) or self.base_changed
        except SurgeryError:
            STATS["refused disabled"] += 1
        assert_unchanged(self.model, before, "disabled")

    @precondition(attached)
    @rule(data=st.data(), name=st.sampled_from(NAMES), how=st.sampled_from(["cat", "linear"]))
    def combine(self, data, name, how):
        sources = list(dict.fromkeys(self.pick(data) for _ in range(data.draw(st.integers(1, 2)))))
        weights = {s: 0.5 for s in sources}
        if self.attempt("combine", lambda: surgery.combine(self.model, weights, name=name, how=how)):
            self.rules[name] = self.rules[sources[0]]

    @precondition(attached)
    @rule(data=st.data())
    def per_sample(self, data):
        rows = [self.pick(data, allow_none=True) for _ in range(2)]
        before = fingerprint(self.model)
        STATS["step per_sample"] += 1
        expected = {}
        if not self.merged():
            previous = surgery.active(self.model)
            for n in set(rows) - {None}:
                if n in self.rules:
                    surgery.set_active(self.model, [n])
                    expected[n] = self.out()
            if self.ledger() is not None:
                surgery.set_active(self.model, previous)
        try:
            with surgery.per_sample(self.model, rows):
                routed = self.out()
            for i, n in enumerate(rows):
                want = self.base_logits if n is None else expected.get(n)
                if want is not None and routed.shape == want.shape and not (n is None and self.base_changed):
                    assert self.close(routed[i], want[i]), f"per_sample row {i} ({n})"
        except SurgeryError:
            STATS["refused per_sample"] += 1
        assert_unchanged(self.model, before, "per_sample")

    @precondition(attached)
    @rule(data=st.data(), fmt=st.sampled_from(["surgery", "peft"]))
    def save_and_load(self, data, fmt):
        name = self.pick(data)
        directory = self.tmp / f"{name}-{fmt}-{STATS['saves']}"
        STATS["saves"] += 1
        if not self.attempt("save", lambda: surgery.save(self.model, directory, name=name, format=fmt)):
            return
        solo, twin = copy.deepcopy(self.model), copy.deepcopy(self.model)
        for other in list(surgery.plugin.attachments(solo)):
            if other != name:
                surgery.detach(solo, other)
        if name in solo._surgery_ledger.merge_order:
            surgery.unmerge(solo, name)
        surgery.set_active(solo, [name])
        for other in list(surgery.plugin.attachments(twin)):
            surgery.detach(twin, other)
        surgery.load(twin, directory, name="loaded")
        STATS[f"loaded {fmt}"] += 1
        assert self.close(self.out(twin), self.out(solo)), f"{fmt} save + load of {self.rules.get(name)}"

    @precondition(attached)
    @rule(steps=st.integers(1, 2))
    def train(self, steps):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params or self.ledger() is None:
            return
        STATS["step train"] += 1
        frozen = {k: v.clone() for k, v in self.model.state_dict().items() if not _trainable(self.model, k)}
        optimizer = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            kwargs = {"labels": self.x}
            loss = self.model(input_ids=self.x, **kwargs).loss
            if not loss.requires_grad:  # nothing trainable runs (nothing active, or only merged attachments)
                return
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for k, v in frozen.items():  # the frozen base does not move
            assert same_bits(self.model.state_dict()[k], v), f"training changed frozen {k}"

    @precondition(attached)
    @rule(data=st.data(), seed=st.integers(0, 9))
    def change(self, data, seed):
        name = self.pick(data)
        """New values for an attachment's tensors, as training or a loaded state dict would give."""
        ledger = self.ledger()
        if ledger is None or name not in ledger.attachments:
            return
        STATS["step change"] += 1
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for branch in ledger.attachments[name].branches.values():
                for p in branch.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
        if name in self.merged():
            self.changed_while_merged.add(name)

    @precondition(attached)
    @rule(data=st.data(), k=st.integers(1, 24),
          step=st.sampled_from(["merge", "attach", "detach", "unmerge", "bake", "combine", "set_active"]))
    def fault(self, data, k, step):
        """One of the passes with a fault injected at its k-th step (an engine primitive that changes the model or
        the ledger, or a plugin's code run inside the pass): if it fires, nothing may have changed; if the pass
        has fewer steps, it runs as the plain rule does, with the same checks."""
        kwargs = {"data": data}
        if step == "attach":
            free = [n for n in NAMES if n not in self.rules] or list(NAMES)
            kwargs = {"name": data.draw(st.sampled_from(free)), "rules": data.draw(st.sampled_from(sorted(RULES)))}
        elif step == "merge":
            kwargs["exact"] = data.draw(st.booleans())
        elif step == "combine":
            kwargs.update(name=data.draw(st.sampled_from(NAMES)), how=data.draw(st.sampled_from(["cat", "linear"])))
        STATS["fault rules"] += 1
        before = fingerprint(self.model)
        faults = Faults(k)
        with pytest.MonkeyPatch.context() as patch:
            inject(patch, faults, self.model)
            try:
                getattr(self, step)(**kwargs)
            except InjectedFault:
                pass
            finally:
                unwrap_undos(self.model)
        if faults.fired:
            STATS["faults injected"] += 1
            assert_unchanged(self.model, before, f"{step} with a fault at step {k} ({faults.where})")

    # ---- the invariants ---------------------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        if not hasattr(self, "model"):
            return
        ledger = self.ledger()
        hosts = [m for m in self.model.modules() if isinstance(m, Host)]
        if ledger is None:
            assert not hosts and surgery.active(self.model) == []
            return
        assert ledger.attachments, "an empty ledger was left on the model"
        assert set(ledger.merge_order) <= set(ledger.active) == set(surgery.active(self.model))
        assert not ledger.disabled and ledger.routing is None
        assert set(ledger.hosts.values()) == set(hosts)
        for path, host in ledger.hosts.items():
            assert self.model.get_submodule(path) is host and host.branches
            assert list(host.branches) == [n for n in ledger.attachments if n in host.branches]
            running = tuple(n for n in host.branches if n in ledger.active and ledger.attachments[n].merged is None)
            assert host.running == running, f"{path} runs {host.running}, active says {running}"
        for name, attachment in ledger.attachments.items():
            for path, branch in attachment.branches.items():
                assert ledger.hosts[path].branches[name] is branch

    @invariant()
    def base_when_idle(self):
        if not hasattr(self, "model"):
            return
        ledger = self.ledger()
        if ledger is None:
            now = fingerprint(self.model)
            for field in ("modules", "params", "hooks", "configs"):
                assert getattr(now, field) == getattr(self.original, field), f"{field} differ after the last detach"
            if not self.base_changed:
                for k, v in self.base_bits.items():
                    assert same_bits(now.tensors[k], v), f"{k} differs after the last detach"
            else:  # the new base: what an inexact unmerge or a bake left
                self.base_bits, self.base_changed = dict(now.tensors), False
                self.base_logits = self.out()
                STATS["rebased"] += 1
            assert torch.equal(self.out(), self.base_logits)
            STATS["back to the base"] += 1
        elif not ledger.active and not self.base_changed:
            assert torch.equal(self.out(), self.base_logits), "nothing active, yet the outputs are not the base's"
        out = self.out()
        assert torch.isfinite(out).all()


def _trainable(model, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and params[key].requires_grad


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
                    derandomize=not RANDOM, suppress_health_check=list(HealthCheck), print_blob=True,
                    phases=[p for p in Phase if p is not Phase.shrink or not os.environ.get("SURGERY_SM_NO_SHRINK")])

for _arch, _dtype, _pruned in CONFIGS:  # one test per configuration, each with its own examples
    _name = f"Test{_arch.capitalize()}{'Bf16' if _dtype == torch.bfloat16 else 'Fp32'}{'Pruned' if _pruned else ''}"
    _machine = type(_name.replace("Test", "Machine"), (SurgeryMachine,), {"configs": [(_arch, _dtype, _pruned)]})
    _machine.TestCase.settings = SETTINGS
    globals()[_name] = _machine.TestCase


def teardown_module(module):
    if os.environ.get("SURGERY_SM_REPORT"):
        steps = sum(v for k, v in STATS.items() if k.startswith("step "))
        print(f"\nstate machine: {STATS['examples']} sequences, {steps} steps, {STATS['faults injected']} faults "
              f"injected;", dict(sorted(STATS.items())))
