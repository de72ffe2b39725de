"""WKV6 backends: accuracy against the reference and forward+backward time, printed as a table.

CPU (the issue's CPU target: chunked >= 10x the reference at B=2, T=512, C=256):
    .venv/bin/python benchmarks/bench_wkv.py
GPU (fla vs reference in bf16, and fla timing at B=16, T=1024, C=2048):
    python benchmarks/bench_wkv.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from visualrwkv.ops import fla_available, wkv6  # noqa: E402


def inputs(B, T, C, device, dtype, decay="moderate", seed=0):
    H, N = C // 64, 64
    g = torch.Generator(device="cpu").manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    # Raw decays like a trained model's: decay = exp(-exp(w)) mostly in (0.6, 1).
    w = torch.randn(B, T, H, N, generator=g) - (1.0 if decay == "moderate" else -1.0)
    u = torch.randn(H, N, generator=g) * 0.5
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (r, k, v, w, u)]


def fwd_bwd(backend, args, **kw):
    y, s = wkv6(*args, backend=backend, output_final_state=True, **kw)
    (y.float().sum() + s.sum()).backward()


def timeit(fn, device, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cpu(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    B, T, C = 2, 512, 256
    rows = []
    for decay in ("moderate", "strong"):
        base = inputs(B, T, C, "cpu", torch.float32, decay)
        t_ref = timeit(lambda: fwd_bwd("reference", [x.detach().requires_grad_() for x in base]), "cpu", args.repeat)
        t_chk = timeit(lambda: fwd_bwd("chunked", [x.detach().requires_grad_() for x in base]), "cpu", args.repeat)
        rows.append((decay, t_ref * 1e3, t_chk * 1e3, t_ref / t_chk))
    print(f"\nWKV6 forward+backward on CPU, B={B} T={T} C={C} (H={C // 64}, N=64), fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"| decays | reference (ms) | chunked (ms) | speed-up |\n|---|---|---|---|")
    for d, a, b, s in rows:
        print(f"| {d} | {a:.1f} | {b:.1f} | {s:.1f}x |")


def gpu(args):
    if not torch.cuda.is_available():
        print("bench_wkv: --device cuda needs a CUDA GPU; none is visible.")
        return 1
    if not fla_available():
        print("bench_wkv: the fla backend needs flash-linear-attention (pip install 'visualrwkv[gpu]').")
        return 1
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}")
    # Accuracy: fla in bf16 vs the fp32 reference, B=4, T=1024, C=2048.
    B, T, C = 4, 1024, 2048
    base = inputs(B, T, C, dev, torch.float32)
    ref = [x.detach().clone().requires_grad_() for x in base]
    y1, s1 = wkv6(*ref, backend="reference", output_final_state=True)
    gy = torch.randn_like(y1)
    ((y1 * gy).sum() + s1.sum()).backward()
    bf = [x.detach().to(torch.bfloat16).requires_grad_() for x in base]
    y2, s2 = wkv6(*bf, backend="fla", output_final_state=True)
    ((y2.float() * gy).sum() + s2.sum()).backward()
    print(f"\nfla (bf16) vs reference (fp32), B={B} T={T} C={C}: relative errors")
    print("| tensor | rel. error |\n|---|---|")
    print(f"| y | {rel(y2, y1):.2e} |\n| final state | {rel(s2, s1):.2e} |")
    for name, a, b in zip("r k v w u".split(), bf, ref):
        print(f"| grad {name} | {rel(a.grad, b.grad):.2e} |")
    # Timing at B=16, T=1024, C=2048 (the original's reference figure: 4.62 ms for fla, 6.72 ms CUDA).
    rows = []
    for (B, T, C) in [(16, 1024, 2048), (8, 2048, 2048)]:
        base = inputs(B, T, C, dev, torch.bfloat16)
        t_fla = timeit(lambda: fwd_bwd("fla", [x.detach().requires_grad_() for x in base]), dev, args.repeat, 3)
        t_chk = timeit(lambda: fwd_bwd("chunked", [x.detach().requires_grad_() for x in base]), dev, 3, 1)
        rows.append((B, T, C, t_fla * 1e3, t_chk * 1e3))
    print("\nWKV6 forward+backward, bf16 inputs (median)")
    print("| B | T | C | fla (ms) | pure-PyTorch chunked (ms) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} |")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    return cpu(a) if a.device == "cpu" else gpu(a)


if __name__ == "__main__":
    sys.exit(main() or 0)
