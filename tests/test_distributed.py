"""Two processes on the CPU (torch.distributed, gloo): an attached model trained with DDP and with FSDP2
(`fully_shard`, the frozen base sharded, only the adapter trained). Gradients equal those of one process on the
same global batch; `surgery.save` gathers the sharded adapter tensors and the file loads into a plain model with
the same outputs. `accelerate launch` with a config file trains an attached model too (skipped without
accelerate).

The two processes are started once for the module (spawn), and each test reads what they found."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import surgery
from surgery import tiny
from tests.conftest import gloo_group

WORLD = 2
GLOBAL_BATCH = 4


def _model() -> torch.nn.Module:
    """A tiny Llama with LoRA on q and v, B drawn non-zero (the same on every rank: seeded)."""
    model = tiny.build("llama", seed=0)
    surgery.attach(model, "lora-qv", name="a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch() -> torch.Tensor:
    return torch.randint(3, 128, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(2))


def _reference() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One process, the whole batch: the adapter gradients (mean of the per-rank losses) and, after one SGD step,
    the logits of the batch."""
    model = _model()
    x = _batch()
    losses = [model(input_ids=part, labels=part).loss for part in x.chunk(WORLD)]
    (sum(losses) / WORLD).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        return grads, model(input_ids=x).logits


def _worker(rank: int, out: str) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)
    gloo_group(f"file://{out}/store", rank=rank, world_size=WORLD)
    try:
        x = _batch()
        mine = x.chunk(WORLD)[rank]
        found: dict[str, object] = {}

        # DDP: the base is frozen, so DDP registers (and all-reduces) the adapter's parameters only
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = _model()
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        ddp = DDP(model)
        ddp(input_ids=mine, labels=mine).loss.backward()
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters() if p.requires_grad}
        torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5).step()
        found["ddp_base_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
        found["ddp_base_same"] = all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        if rank == 0:
            torch.save(grads, f"{out}/ddp_grads.pt")
            surgery.save(ddp, f"{out}/ddp_adapter", name="a")  # from rank 0 only: plain tensors, nothing to gather
            with torch.no_grad():
                torch.save(model(input_ids=x).logits, f"{out}/ddp_logits.pt")

        # FSDP2: every decoder layer and the root sharded; the frozen base is sharded like the rest
        from torch.distributed.fsdp import fully_shard
        model = _model()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        from torch.distributed.tensor import DTensor
        found["fsdp_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        model(input_ids=mine, labels=mine).loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        found["fsdp_base_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        with torch.no_grad():
            logits = model(input_ids=x).logits  # every rank runs it: FSDP gathers the shards
        path = surgery.save(model, f"{out}/fsdp_adapter", name="a")  # every rank: the gather is collective
        found["fsdp_saved_by"] = rank if path is not None and (Path(out) / "fsdp_adapter").is_dir() else None
        surgery.save(model, f"{out}/fsdp_peft", name="a", format="peft")  # any format: the same gathered tensors
        if rank == 0:
            torch.save(grads, f"{out}/fsdp_grads.pt")
            torch.save(logits, f"{out}/fsdp_logits.pt")
        dist.barrier()
        (Path(out) / f"found{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def _spawn(out: Path) -> None:
    mp.start_processes(_worker, args=(str(out),), nprocs=WORLD, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The two processes' findings. A worker killed by a signal (a native crash inside torch's gloo or allocator,
    seen once on a CI machine as glibc's "malloc(): unaligned tcache chunk detected") is not a finding about
    surgery, whose code here is pure Python: if both workers had written their findings (so the crash came in
    teardown) the findings stand; otherwise the pair runs once more, and a second crash fails the test. A Python
    exception in a worker is never retried."""
    crashes = []
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"dist{attempt}")
        try:
            _spawn(out)
            return out
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None:
                raise
            crashes.append(str(crash))
            if all((out / f"found{r}.json").is_file() for r in range(WORLD)):
                warnings.warn(f"a worker crashed in teardown after writing its findings: {crash}")
                return out
    pytest.fail("both runs of the two workers crashed: " + " | ".join(crashes))


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return _reference()


def _found(out: Path) -> list[dict]:
    return [json.loads((out / f"found{r}.json").read_text()) for r in range(WORLD)]


def _plain_with(adapter: Path) -> torch.nn.Module:
    model = tiny.build("llama", seed=0)
    surgery.load(model, adapter)
    return model


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_gradients_equal_one_process(run, reference, engine):
    grads = torch.load(run / f"{engine}_grads.pt")
    expected, _ = reference
    assert set(grads) == set(expected) and grads
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert all(f[f"{engine}_base_grads"] == 0 for f in _found(run)), "the frozen base got gradients"


def test_ddp_trains_adapter_only_and_saves_from_rank0(run, reference):
    assert all(f["ddp_base_same"] for f in _found(run))
    _, logits = reference
    ddp_logits = torch.load(run / "ddp_logits.pt")
    torch.testing.assert_close(ddp_logits, logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_plain_with(run / "ddp_adapter")(input_ids=_batch()).logits, ddp_logits,
                                   rtol=1e-5, atol=1e-5)


def test_fsdp2_save_gathers_shards_on_rank0(run, reference):
    found = _found(run)
    assert all(f["fsdp_sharded"] for f in found)
    assert found[0]["fsdp_saved_by"] == 0
    fsdp_logits = torch.load(run / "fsdp_logits.pt")
    torch.testing.assert_close(fsdp_logits, reference[1], rtol=1e-5, atol=1e-5)
    plain = _plain_with(run / "fsdp_adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=_batch()).logits, fsdp_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_plain_with(run / "fsdp_peft")(input_ids=_batch()).logits, fsdp_logits,
                                   rtol=1e-5, atol=1e-5)
    # the saved tensors are whole (gathered), not one rank's shard
    shapes = {n: p.shape for n, p in _model().named_parameters() if p.requires_grad}
    loaded = {n: p.shape for n, p in plain.named_parameters() if p.requires_grad}
    assert loaded == shapes


ACCELERATE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    import surgery
    from surgery import tiny

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.device.type == "cpu", accelerator.state
    model = tiny.build("llama", seed=0)
    surgery.attach(model, "lora-qv", name="a")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(2)).chunk(2)[accelerator.process_index]
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    plain = accelerator.unwrap_model(model)
    assert all(torch.equal(p, base[n]) for n, p in plain.named_parameters() if n in base), "the base changed"
    assert any(not torch.equal(p, before[n]) for n, p in plain.named_parameters() if n in before), "nothing trained"
    trained = torch.cat([p.detach().flatten() for p in plain.parameters() if p.requires_grad])
    gathered = accelerator.gather(trained[None])
    assert torch.equal(gathered[0], gathered[1]), "the ranks' adapters differ"
    if accelerator.is_main_process:
        surgery.save(model, sys.argv[1], name="a")
        torch.save(plain(input_ids=x).logits.detach(), sys.argv[1] + ".logits.pt")
        torch.save(x, sys.argv[1] + ".x.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()
""")


def test_accelerate_launch_with_config(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    config = tmp_path / "accelerate.yaml"
    # MULTI_GPU is the type for which `accelerate launch` starts the processes itself (through torchrun); on the CPU,
    # `Accelerator(cpu=True)` joins them with gloo (MULTI_CPU with use_cpu: true would want mpirun instead)
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      f"num_processes: {WORLD}\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\n"
                      "rdzv_backend: static\nsame_network: true\ngpu_ids: all\n")
    script = tmp_path / "train.py"
    script.write_text(ACCELERATE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--main_process_port", "0", str(script), str(tmp_path / "adapter")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = _plain_with(tmp_path / "adapter")
    x = torch.load(str(tmp_path / "adapter") + ".x.pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, torch.load(str(tmp_path / "adapter") + ".logits.pt"),
                                   rtol=1e-5, atol=1e-5)
