"""The skinny matmuls of a LoRA branch (rank r against T tokens), in several operand layouts, against the time
their memory traffic needs at the measured copy bandwidth. GPU only.

    python benchmarks/lora_gemm_layouts.py
"""
from __future__ import annotations

import torch

T, R = 8192, 16
SHAPES = [(2048, 2048), (2048, 512), (2048, 5632), (5632, 2048)]  # (in, out) of the model's linears


def time_ms(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    dt, dev = torch.bfloat16, "cuda"
    big = torch.randn(256 * 2**20, device=dev, dtype=dt)
    copy_ms = time_ms(lambda: big.clone(), 20)
    bandwidth = 2 * big.numel() * 2 / (copy_ms / 1000)  # bytes read + written per second
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for fin, fout in SHAPES:
        x = torch.randn(T, fin, device=dev, dtype=dt)
        y = torch.randn(T, fout, device=dev, dtype=dt)
        dy = torch.randn(T, fout, device=dev, dtype=dt)
        a = torch.randn(R, fin, device=dev, dtype=dt) * 0.01
        at = a.t().contiguous()
        b = torch.randn(fout, R, device=dev, dtype=dt) * 0.01
        h = x @ a.t()
        dh = dy @ b
        dx = torch.randn(T, fin, device=dev, dtype=dt)
        cases = {
            "fwd h = x @ A.T": (lambda: x @ a.t(), T * fin * 2),
            "fwd h = x @ At (A.T stored)": (lambda: x @ at, T * fin * 2),
            "fwd h = (A @ x.T).T": (lambda: (a @ x.t()), T * fin * 2),
            "fwd y.addmm_(h, B.T)": (lambda: y.addmm_(h, b.t(), alpha=1e-3), 2 * T * fout * 2),
            "bwd dh = dy @ B": (lambda: dy @ b, T * fout * 2),
            "bwd dB = dy.T @ h": (lambda: dy.t() @ h, T * fout * 2),
            "bwd dB = (h.T @ dy).T": (lambda: h.t() @ dy, T * fout * 2),
            "bwd dA = dh.T @ x": (lambda: dh.t() @ x, T * fin * 2),
            "bwd dA = (x.T @ dh).T": (lambda: x.t() @ dh, T * fin * 2),
            "bwd dx.addmm_(dh, A)": (lambda: dx.addmm_(dh, a), 2 * T * fin * 2),
            "bwd [dh | dB] one pass (reference: read dy once)": (None, T * fout * 2),
        }
        for name, (fn, nbytes) in cases.items():
            bound = nbytes / bandwidth * 1000
            ms = time_ms(fn) if fn is not None else float("nan")
            rows.append((f"{fin}->{fout}", name, ms, bound))
    print(f"\n{'linear':12s} {'op':48s} {'ms':>8s} {'bound ms':>9s} {'x bound':>8s}")
    for shape, name, ms, bound in rows:
        print(f"{shape:12s} {name:48s} {ms:8.4f} {bound:9.4f} {ms / bound:8.2f}")


if __name__ == "__main__":
    main()
