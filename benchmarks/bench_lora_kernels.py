"""The LoRA kernels that read a whole activation, at the grid's shapes, per tile candidate (plugins/lora/tiles.py):
`dropped_down` (h = drop(x) @ A.T, every adapted input, with dropout) and `up_grads` (dh = dy @ B and dB = dy.T @ h
in one pass over each dy, q/k/v and gate/up), each candidate's ms against the least time its bytes take at the
copy bandwidth measured in the call (x or the dys read once), and against cuBLAS doing the same products without
dropout (x @ A.T; dy @ B and dy.T @ h). Candidates with "waves" cut the sums into column ranges where few row
tiles would leave multiprocessors idle (kernels._splits); the tuner's own pick is shown beside. Then each site of
the rows' unmerged inference forward, through the merged weight (its kernel's tiles tuned) and by the separate
update, as × its base matmuls, and which of the two the dispatch takes (dispatch.merged_pays). Every ms is one
call's time on the device alone (harness.device_ms: 20 calls in a CUDA graph), without the host's work to issue it.

    python benchmarks/bench_lora_kernels.py --device cuda [--rows 5 6] [--no-inference]

Results: benchmarks/results/bench_lora_kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import bench_grid
import harness
import torch


def sites(row: int) -> tuple[dict, list, list, list]:
    """(the row's settings, its down sites (tokens, in, members, rank), its up sites (tokens, outs, rank), its
    linear sites (tokens, in, outs, rank): q/k/v, o, gate/up, down)."""
    name, config, batch, seq, r, p, dtype = bench_grid.GRID[row]
    c = {**bench_grid.BASE, **config}
    t, hidden, mlp = batch * seq, c["hidden_size"], c["intermediate_size"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    linears = [(t, hidden, (hidden, kv, kv), r), (t, hidden, (hidden,), r), (t, hidden, (mlp, mlp), r),
               (t, mlp, (hidden,), r)]
    down = [(t, k, len(outs), r) for t, k, outs, r in linears]
    up = [(t, outs, r) for t, _, outs, r in linears if len(outs) > 1]  # the groups: q/k/v, gate/up
    return {"name": name, "p": p, "dtype": bench_grid.DTYPES[dtype]}, down, up, linears


def candidates_ms(kind: str, run, device: str, kernels, tiles) -> list[dict]:
    """ms of `run()` with each candidate of `kind` forced (tuning off), by `harness.device_ms`."""
    out = []
    for config in tiles.CANDIDATES[kind]:
        kernels.CONFIGS[kind] = config
        kernels.clear_launches()
        try:
            out.append({"config": config, "ms": round(harness.device_ms(run, device), 4)})
        except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot run is reported, not fatal
            out.append({"config": config, "error": type(e).__name__})
    kernels.CONFIGS[kind] = tiles.CANDIDATES[kind][0]
    kernels.clear_launches()
    return out


def tuned(kind: str, run, kernels, tiles) -> dict:
    """The candidate the tuner picks for `run`'s shape (a fresh cache)."""
    before = dict(tiles._chosen)  # internal: the process's choices
    tiles.forget()
    os.environ["SURGERY_TUNE"] = "1"
    kernels.clear_launches()
    run()
    picked = [v for k, v in tiles._chosen.items() if k.startswith(kind + "|")]
    os.environ["SURGERY_TUNE"] = "0"
    tiles._chosen.update(before)
    return picked[-1] if picked else {}


def summary(found: list[dict], least: float, cublas: float) -> dict:
    ok = [c for c in found if "ms" in c]
    best = min(ok, key=lambda c: c["ms"])
    plain = min((c for c in ok if not c["config"].get("waves")), key=lambda c: c["ms"])
    return {"least_ms": round(least, 4), "cublas_ms": round(cublas, 4), "default_ms": ok[0]["ms"],
            "best_unsplit_ms": plain["ms"], "best_ms": best["ms"], "best": best["config"],
            "best_x_least": round(best["ms"] / least, 2), "default_x_least": round(ok[0]["ms"] / least, 2),
            "best_x_cublas": round(best["ms"] / cublas, 2), "candidates": found}


def inference_site(t: int, k: int, outs: tuple, r: int, dtype: torch.dtype, device: str, internals) -> dict:
    """One site of the unmerged inference forward (no grad, no dropout), members of widths `outs` on one input, as ×
    its base matmuls: through the merged weight (built by the kernel, its tiles tuned) and by the separate update
    (update_first.py, shared.py); and which of the two the dispatch takes (merged_pays)."""
    fused, shared, dispatch = internals.fused, internals.shared, internals.dispatch
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, k, device=device, generator=g).to(dtype)
    members = []
    for o in outs:
        members += [(torch.randn(o, k, device=device, generator=g) / k ** 0.5).to(dtype), None,
                    (torch.randn(r, k, device=device, generator=g) / k ** 0.5).to(dtype),
                    (torch.randn(o, r, device=device, generator=g) * 0.05).to(dtype)]
    ws = members[::4]

    def form(merged: bool):
        if len(outs) > 1:
            return lambda: shared.inference(x, (2.0,) * len(outs), merged, True, *members)
        return lambda: fused.inference(x, *members, 2.0, merged, True)
    with torch.no_grad():
        base = harness.device_ms(lambda: [torch.nn.functional.linear(x, w) for w in ws], device)
        merged, separate = (harness.device_ms(form(m), device) for m in (True, False))
    return {"base_ms": round(base, 4), "merged_x_base": round(merged / base, 3),
            "separate_x_base": round(separate / base, 3), "takes_merged": all(dispatch.merged_pays(t, w) for w in ws)}


def down_site(t: int, k: int, members: int, r: int, p: float, dtype: torch.dtype, device: str, copy_gbps: float,
              kernels, tiles) -> dict:
    """`dropped_down` on an [t, k] input for `members` of rank r: each candidate, the tuner's pick, cuBLAS's x @ A.T."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, k, device=device, generator=g).to(dtype)
    a = (torch.randn(members * r, k, device=device, generator=g) / k ** 0.5).to(dtype)
    seed = torch.tensor([7], device=device)  # on the device, as the layers pass it: nothing copied per call

    def run():
        return kernels.dropped_down(x, a, members, p, seed)
    least = t * k * x.element_size() / copy_gbps / 1e6
    found = summary(candidates_ms("down", run, device, kernels, tiles), least,
                    harness.device_ms(lambda: x @ a.t(), device))
    found["tuned"] = tuned("down", run, kernels, tiles)
    return found


def up_site(t: int, outs: tuple, r: int, dtype: torch.dtype, device: str, copy_gbps: float, kernels, tiles) -> dict:
    """`up_grads` for members of widths `outs` and rank r over t rows: each candidate, the tuner's pick, and cuBLAS's
    dy @ B and dy.T @ h per member."""
    g = torch.Generator(device=device).manual_seed(0)
    dys = [torch.randn(t, o, device=device, generator=g).to(dtype) for o in outs]
    b_s = [(torch.randn(o, r, device=device, generator=g) * 0.05).to(dtype) for o in outs]
    h = torch.randn(t, r * len(outs), device=device, generator=g).to(dtype)
    dh = torch.empty_like(h)
    cols = [i * r for i in range(len(outs))]

    def run():
        return kernels.up_grads(dys, b_s, h, cols, dh, [2.0] * len(outs), [1.0] * len(outs))

    def two_matmuls():
        for dy, b, col in zip(dys, b_s, cols):
            torch.mm(dy, b)
            torch.mm(dy.t(), h[:, col:col + r])
    least = sum(t * o for o in outs) * h.element_size() / copy_gbps / 1e6
    found = summary(candidates_ms("up", run, device, kernels, tiles), least,
                    harness.device_ms(two_matmuls, device))
    found["tuned"] = tuned("up", run, kernels, tiles)
    return found


def report(key: str, name: str, found: dict) -> None:
    print(f"{key} | {name} | least {found['least_ms']} | cuBLAS {found['cublas_ms']} | default {found['default_ms']} "
          f"| best unsplit {found['best_unsplit_ms']} | best {found['best_ms']} {found['best']} | tuned "
          f"{found['tuned']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", nargs="*", type=int, default=[5, 6])
    parser.add_argument("--no-inference", action="store_true", help="skip the unmerged inference forms")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    os.environ["SURGERY_CACHE"] = tempfile.mkdtemp()
    os.environ["SURGERY_TUNE"] = "0"
    internals = harness.lora_internals()
    kernels, tiles = internals.kernels, internals.tiles
    block = torch.empty(1 << 29, dtype=torch.float16, device=device)
    copy_gbps = 2 * block.numel() * 2 / harness.time_ms(block.clone, device, 10, 2) / 1e6
    block = None
    results: dict = {"copy_gbps": round(copy_gbps)}
    for row in args.rows:
        info, downs, ups, _ = sites(row)
        dtype, p = info["dtype"], info["p"] or 0.05
        key = f"row {row}: {info['name']}"
        results[key] = {}
        for t, k, members, r in downs:
            name = f"down {t} x {k}, {members} x r{r}, p {p}"
            results[key][name] = down_site(t, k, members, r, p, dtype, device, copy_gbps, kernels, tiles)
            report(key, name, results[key][name])
        for t, outs, r in ups:
            name = f"up {t} x {'/'.join(map(str, outs))}, r{r}"
            results[key][name] = up_site(t, outs, r, dtype, device, copy_gbps, kernels, tiles)
            report(key, name, results[key][name])
    if not args.no_inference:
        os.environ["SURGERY_TUNE"] = "1"
        results["inference"] = {}
        for row in args.rows:
            info, _, _, linears = sites(row)
            for t, k, outs, r in linears:
                site = f"row {row}: {t} x {k} -> {'/'.join(map(str, outs))}, r{r}"
                found = inference_site(t, k, outs, r, info["dtype"], device, internals)
                results["inference"][site] = found
                print(f"{site} | base {found['base_ms']} ms | merged {found['merged_x_base']} | separate "
                      f"{found['separate_x_base']} | dispatch takes "
                      f"{'merged' if found['takes_merged'] else 'separate'}", flush=True)
    path = harness.write_results("bench_lora_kernels", device, results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
