"""Tile sizes for the LoRA kernels, chosen per shape on the GPU at hand: each candidate is timed once on scratch
tensors of the call's shape, the fastest is kept in memory and in a JSON file per GPU, Triton version and list of
candidates, so a shape is tuned once per machine and again when the candidates change.

The defaults (`kernels.CONFIGS`) were the fastest on an H100 at rank 16; at rank 64 and above their backward tile
holds three [rank, BK] accumulators in registers and spills. Rather than a table per GPU, the candidates below
cover the ranks and widths the kernels take and the timing picks. Tuning is skipped (the default taken, not
kept) while a CUDA graph is being captured, under Triton's interpreter, and with SURGERY_TUNE=0. The file lives
in SURGERY_CACHE (default ~/.cache/surgery), named for the GPU, the Triton version and the candidates; a write
that fails leaves the in-memory choice.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

# Candidates per kernel; the first is the default. Each is valid for every rank up to MAX_RANK (BK a multiple of
# 8 for the dropout mask's 8-column draws, every tile side >= 16 for tl.dot). "waves" (down, up): programs per
# multiprocessor that a launch of few row tiles reaches by cutting its sums into column ranges (kernels._splits);
# without it, one range.
CANDIDATES: dict[str, list[dict]] = {
    "down": [{"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
             {"BM": 32, "BK": 128, "num_warps": 4, "num_stages": 3},
             {"BM": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
             {"BM": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
             {"BM": 32, "BK": 64, "num_warps": 4, "num_stages": 4},
             {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "waves": 2},
             {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "waves": 4},
             {"BM": 128, "BK": 64, "num_warps": 8, "num_stages": 3, "waves": 2},
             {"BM": 32, "BK": 128, "num_warps": 4, "num_stages": 3, "waves": 4}],
    "grads": [{"BM": 32, "BK": 128, "num_warps": 4, "num_stages": 3, "waves": 8},
              {"BM": 32, "BK": 64, "num_warps": 4, "num_stages": 3, "waves": 8},
              {"BM": 32, "BK": 64, "num_warps": 8, "num_stages": 3, "waves": 8},
              {"BM": 32, "BK": 32, "num_warps": 4, "num_stages": 3, "waves": 8},
              {"BM": 64, "BK": 32, "num_warps": 4, "num_stages": 3, "waves": 4}],
    "up": [{"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3},
           {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3},
           {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
           {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
           {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3, "waves": 2},
           {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3, "waves": 2},
           {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3, "waves": 4}],
    "merged": [{"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 1},
               {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 1},
               {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 1},
               {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 1},
               {"BM": 32, "BN": 256, "num_warps": 4, "num_stages": 1}],
}

_chosen: dict[str, dict] = {}  # "kind|key" -> config, this process's choices (and the file's, once read)
_loaded: set[Path] = set()


def enabled(device: torch.device) -> bool:
    """Whether calls on `device` tune: CUDA, not capturing a graph, not interpreting, SURGERY_TUNE not 0."""
    return (device.type == "cuda" and os.environ.get("SURGERY_TUNE", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_current_stream_capturing())


def cache_file(device: torch.device) -> Path:
    """The choices' file for the GPU of `device`, the installed Triton and these candidates (a version whose
    candidates differ tunes again, rather than keep choices made among others)."""
    import triton

    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    root = Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery")
    return root / f"lora-tiles-{name}-triton{triton.__version__}-{candidates_key()}.json"


def candidates_key() -> str:
    """A short digest of CANDIDATES."""
    return hashlib.sha256(json.dumps(CANDIDATES, sort_keys=True).encode()).hexdigest()[:12]


def cuda_ms(fn: Callable[[], None], reps: int = 5) -> float:
    """The median time of `fn` in ms over `reps` runs after one warm-up, by CUDA events."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose(kind: str, key: tuple, trial: Callable[[dict], Callable[[], None]], file: Path | None,
           timer: Callable[[Callable[[], None]], float] = cuda_ms) -> dict:
    """The fastest of `CANDIDATES[kind]` for `key` (the call's shape): `trial(config)` gives a function that runs
    the kernel with `config` on scratch tensors; `timer` times it. A candidate that fails to compile or launch
    (too much shared memory, say) is skipped. Known choices come from memory or `file`; a new one is written to
    `file` (None: kept in memory only)."""
    name = f"{kind}|{'|'.join(map(str, key))}"
    if file is not None and file not in _loaded:
        _loaded.add(file)
        try:
            _chosen.update({k: v for k, v in json.loads(file.read_text()).items() if k not in _chosen})
        except (OSError, ValueError):
            pass
    if name in _chosen:
        return _chosen[name]
    timed = []
    for config in CANDIDATES[kind]:
        try:
            timed.append((timer(trial(config)), config))
        except Exception:  # noqa: BLE001, S112 - a candidate this GPU cannot run is not a choice
            continue
    best = min(timed, key=lambda t: t[0])[1] if timed else CANDIDATES[kind][0]
    _chosen[name] = best
    if file is not None:
        _save(file)
    return best


def _save(file: Path) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_chosen, indent=0, sort_keys=True))
        os.replace(tmp, file)
    except OSError:
        pass


def forget() -> None:
    """Drop this process's choices (the file stays); the next call of each shape reads the file or tunes again."""
    _chosen.clear()
    _loaded.clear()
