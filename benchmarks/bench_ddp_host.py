"""What DDP's reducer costs the host per parameter, apart from any GPU work or communication.

A model of ``--params`` tiny parameters (so the arithmetic is negligible) runs forward + backward plainly and
wrapped in DistributedDataParallel as ``visualrwkv train --strategy ddp`` builds it (gradients as bucket views,
no buffer sync), in one gloo process: the difference is DDP's per-parameter autograd hooks and bucket
bookkeeping on the host. Under CUDA each parameter adds a gradient copy into its bucket on top (the r69 profile:
685 device-to-device copies, 6.5 ms of GPU time in a 1.6B stage-2 step).

    python benchmarks/bench_ddp_host.py                    # 100, 400 and 1600 parameters
    python benchmarks/bench_ddp_host.py --params 400 --reps 500
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visualrwkv.train.strategies import no_buffer_sync_kwargs  # noqa: E402


class Many(torch.nn.Module):
    """``n`` parameters of 8 elements, each used once: n AccumulateGrad nodes, n DDP hooks."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8)) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(p * x).sum() for p in self.ps]).sum()


def per_step_ms(model: torch.nn.Module, reps: int) -> float:
    x = torch.randn(8)
    for _ in range(10):  # DDP rebuilds its buckets in the first steps
        model(x).backward()
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed by other work on the host
        t = time.perf_counter()
        for _ in range(reps):
            model(x).backward()
            model.zero_grad(set_to_none=True)
        best = min(best, (time.perf_counter() - t) / reps * 1e3)
    return best


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="100,400,1600", help="comma-separated parameter counts")
    p.add_argument("--reps", type=int, default=200, help="steps per timing")
    a = p.parse_args(argv)
    import torch.distributed as dist

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            print(f"# torch {torch.__version__}, one gloo process, CPU tensors; forward + backward per step")
            print("| parameters | plain ms | DDP ms | DDP's host cost per parameter (us) |")
            print("|---:|---:|---:|---:|")
            for n in (int(v) for v in a.params.split(",")):
                plain = per_step_ms(Many(n), a.reps)
                ddp = torch.nn.parallel.DistributedDataParallel(Many(n), gradient_as_bucket_view=True,
                                                                bucket_cap_mb=100, **no_buffer_sync_kwargs())
                wrapped = per_step_ms(ddp, a.reps)
                print(f"| {n} | {plain:.2f} | {wrapped:.2f} | {(wrapped - plain) * 1e3 / n:.1f} |", flush=True)
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
