"""ln_x (GroupNorm, one group per head) forward + backward on one CUDA GPU, as a stage-2 step runs it:
eager ``nn.GroupNorm``, torch.compile of ``nn.GroupNorm`` (inductor's native_group_norm lowering, what
the compiled blocks run by default), torch.compile of the same norm written out as per-head mean and
variance over the last dim of (M, H, N) (``per_head_group_norm`` below: measured, not adopted), and the
fused Triton kernels of ``visualrwkv/ops/norm_gate.py`` (norm and gate product in one pass each way).
Each variant computes ``ln_x(y) * g`` from bf16 y, g and back-propagates a bf16 gradient, under bf16
autocast like training.

    python benchmarks/bench_groupnorm.py                      # 11,800 tokens x 2048 (32 heads of 64)
    python benchmarks/bench_groupnorm.py --tokens 4096,11800 --n_embd 2048 --head_size 64

Prints one row per (tokens, variant): wall ms per forward + backward (median of --iters, host work
included), kernel ms (the GPU time of its kernels, from torch.profiler: what it costs inside a compiled
training step whose host side runs ahead), effective GB/s at the kernel time (bytes of y, g, out, dout,
dy, dg once each), and the largest difference from eager. ``--fused_configs`` lists the fused kernels'
rows per program x warps to compare (the first is the default of ``visualrwkv/ops/norm_gate.py``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_head_group_norm(y: torch.Tensor, ln) -> torch.Tensor:
    """GroupNorm of (M, C) with ln.num_groups groups, as mean and variance over the last dim of (M, G, C/G)."""
    M, C = y.shape
    G = ln.num_groups
    yh = y.float().view(M, G, C // G)
    mean = yh.mean(-1, keepdim=True)
    d = yh - mean
    var = (d * d).mean(-1, keepdim=True)
    return (d * torch.rsqrt(var + ln.eps)).view(M, C) * ln.weight + ln.bias


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="11800", help="comma-separated token counts (rows)")
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--fused_configs", default="32x8,16x4,64x8",
                   help="comma-separated BLOCK_MxNUM_WARPS of the fused kernels to time")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_groupnorm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch.nn as nn

    C, N = a.n_embd, a.head_size
    ln = nn.GroupNorm(C // N, C, eps=64e-5).cuda()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()

    from gpu_profile import wall_and_kernel_ms
    from visualrwkv.ops.norm_gate import norm_gate_triton

    def step(fn, y, g, dout):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(y, g)
        out.backward(dout)
        return out

    variants = {
        "eager nn.GroupNorm": lambda t, g: ln(t).to(g.dtype) * g,
        "compiled nn.GroupNorm": torch.compile(lambda t, g: ln(t).to(g.dtype) * g, dynamic=True),
        "compiled per-head formula": torch.compile(lambda t, g: per_head_group_norm(t, ln).to(g.dtype) * g,
                                                   dynamic=True),
    }
    for cfg in a.fused_configs.split(","):
        bm, nw = (int(v) for v in cfg.split("x"))
        variants[f"fused Triton {bm}x{nw}"] = (
            lambda t, g, bm=bm, nw=nw: norm_gate_triton(t, g, ln.weight, ln.bias, ln.num_groups, ln.eps, bm, nw))
    print(f"# {torch.cuda.get_device_name()}; ln_x of {C} channels in groups of {N}, bf16 autocast, forward + backward")
    print(f"{'tokens':>7} {'variant':<28} {'wall_ms':>8} {'kern_ms':>8} {'GB/s':>8} {'max|diff|':>10}")
    for M in [int(x) for x in a.tokens.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        y0 = torch.randn(M, C, device="cuda", generator=gen).to(torch.bfloat16)
        g0 = torch.randn(M, C, device="cuda", generator=gen).to(torch.bfloat16)
        dout = torch.randn(M, C, device="cuda", generator=gen).to(torch.bfloat16)
        ref = None
        for name, fn in variants.items():
            y, g = y0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
            def call(fn=fn, y=y, g=g):
                ln.zero_grad()
                y.grad = g.grad = None
                return step(fn, y, g, dout)

            for _ in range(3):  # compile, autotune, warm
                out = call()
            ms, kern = wall_and_kernel_ms(call, a.iters)
            out = call()
            got = torch.cat([out.detach().float().flatten(), y.grad.float().flatten(), ln.weight.grad.float()])
            diff = 0.0 if ref is None else float((got - ref).abs().max())
            ref = got if ref is None else ref
            gb = 6 * M * C * 2 / 1e9
            print(f"{M:>7} {name:<28} {ms:>8.3f} {kern:>8.3f} {gb / kern * 1e3:>8.0f} {diff:>10.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
