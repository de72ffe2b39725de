"""The time mixing's five interpolations (their LoRA's second matmul included) forward + backward on one
CUDA GPU, as a stage-2 step runs them: eager PyTorch (bmm + elementwise), torch.compile of the same
(cuBLAS bmm + inductor's kernels: what the compiled blocks run by default), and the fused Triton
kernels of ``visualrwkv/ops/maa_mix.py``. bf16 x, xx, h and gradients; fp32 maa and w2 (parameters).

    python benchmarks/bench_maa_mix.py                      # 11,800 tokens x 2048, rank 32
    python benchmarks/bench_maa_mix.py --tokens 4096,11800 --n_embd 2048 --rank 32

Prints one row per (tokens, variant): wall ms per forward + backward (median of --iters, host work
included), kernel ms (GPU time of its kernels from torch.profiler: its cost inside a compiled training
step whose host runs ahead), and the largest relative difference of the output and x's gradient from
the eager reference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="11800", help="comma-separated token counts (rows)")
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--rank", type=int, default=32, help="time_maa LoRA rank (32 below C 4096)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--configs", default="",
                   help="extra tile choices of the fused kernels to time, ';'-separated, each "
                        "'fwd=BMxBCxWARPS,rows=BMxBCxWARPS,cols=BMxBCxWARPS' (parts left out keep ops/maa_mix.py's "
                        "defaults; BC must stay 64), e.g. 'rows=16x64x4;fwd=16x64x8'")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_maa_mix.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from gpu_profile import wall_and_kernel_ms
    from visualrwkv.ops import maa_mix as mm
    from visualrwkv.ops.maa_mix import maa_mix_triton, reference_maa_mix

    C, R = a.n_embd, a.rank
    defaults = {"fwd": mm._FWD, "rows": mm._BWD_ROWS, "cols": mm._BWD_COLS}

    def fused(tiles):
        def fn(*t):
            # The kernels read these module constants at launch, the backward's during out.backward():
            # each variant sets its own for all its steps (variants run one after another).
            mm._FWD, mm._BWD_ROWS, mm._BWD_COLS = tiles["fwd"], tiles["rows"], tiles["cols"]
            return maa_mix_triton(*t)
        return fn

    variants = {"eager bmm + mix": reference_maa_mix,
                "compiled bmm + mix": torch.compile(reference_maa_mix, dynamic=True),
                "fused Triton": fused(defaults)}
    for spec in filter(None, a.configs.split(";")):
        tiles = dict(defaults)
        for part in spec.split(","):
            key, _, val = part.partition("=")
            tiles[key.strip()] = tuple(int(v) for v in val.split("x"))
        variants[f"fused {spec}"[:22]] = fused(tiles)
    print(f"# {torch.cuda.get_device_name()}; 5 interpolations of {C} channels, LoRA rank {R}, bf16, forward + backward")
    print(f"{'tokens':>7} {'variant':<22} {'wall_ms':>8} {'kern_ms':>8} {'rel_out':>9} {'rel_dx':>9}")
    for M in [int(x) for x in a.tokens.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        base = [torch.randn(M, C, device="cuda", generator=gen).bfloat16(),
                (torch.randn(M, C, device="cuda", generator=gen) * 0.3).bfloat16(),
                torch.rand(5, C, device="cuda", generator=gen),
                torch.randn(5, M, R, device="cuda", generator=gen).tanh().bfloat16(),
                torch.randn(5, R, C, device="cuda", generator=gen) * 0.1]
        dout = torch.randn(5, M, C, device="cuda", generator=gen).bfloat16()
        ref = None
        for name, fn in variants.items():
            t = [x.clone().requires_grad_(True) for x in base]

            def step():
                for x in t:
                    x.grad = None
                out = fn(*t)
                out.backward(dout)
                return out

            for _ in range(3):  # compile, warm
                step()
            ms, kern = wall_and_kernel_ms(step, a.iters)
            out = step()
            got = (out.detach().float(), t[0].grad.float())
            ref = got if ref is None else ref
            rels = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]
            print(f"{M:>7} {name:<22} {ms:>8.3f} {kern:>8.3f} {rels[0]:>9.1e} {rels[1]:>9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
