import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # LoRA's Triton kernels, where Triton is installed, run interpreted on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))  # `import zoo` (tests/zoo.py: the architecture zoo and its oracle)


def gloo_group(init_method: str, rank: int, world_size: int) -> None:
    """A gloo process group for a test on one machine: on the loopback device where there is one (GLOO_SOCKET_IFNAME,
    set for this process unless set already), and with a time limit, so that a hang fails the test instead of holding
    up the run. (Two full runs on this machine hung in the one-process DDP test, which passed alone and in every run
    since; the cause was not found.)"""
    import torch.distributed as dist

    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))


def ids(batch: int = 2, seq: int = 8, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def logits(model, input_ids: torch.Tensor):
    kw = {"decoder_input_ids": input_ids} if model.config.is_encoder_decoder else {}
    return model(input_ids=input_ids, use_cache=False, **kw).logits if "bert" not in type(model).__name__.lower() \
        else model(input_ids=input_ids).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(saved), "state_dict keys differ"
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"tensor {k} changed"


def train_steps(model, params, x: torch.Tensor, lr: float, steps: int = 8) -> list[float]:
    """A few Adam steps of causal-LM loss on `x` over `params`; the losses, one a step."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def randomize_lora():
    """Give every LoRA B a non-zero value so the branch changes outputs."""
    def apply(model, seed: int = 0, std: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return apply


@pytest.fixture
def fresh_analysis_cache():
    """The analysis cache emptied before and after the test: its models share class names and structures (the
    cache's key) across cases that read differently."""
    from surgery.analysis.facts import _CACHE

    _CACHE.clear()
    yield
    _CACHE.clear()
