"""What a gradient all-reduce running beside the backward's matmuls costs them, on 2+ GPUs of one host.

Under DDP (``visualrwkv train --strategy ddp``) NCCL's all-reduce kernels run on their own stream while
the backward's matmuls run; both want SMs. This measures, per rank, the matmuls of a stage-2 backward's
shape (bf16, T tokens x 2048 wide, 7168 FFN, ``--layers`` of them) alone and beside a stream of 100 MB
all-reduces, under the settings ``train`` exposes:

    python benchmarks/bench_overlap.py                  # all visible GPUs (at least 2), one process each
    python benchmarks/bench_overlap.py --gpus 2 --tokens 15816 --layers 12

Rows (rank 0; median of ``--repeats``): the matmul pass alone (cuBLAS; cuBLASLt targeting N SMs fewer, as
``--ddp_gemm_sm_carveout N``); one 100 MB all-reduce alone and the whole gradient (``--grad_gb``) reduced
alone, i.e. DDP with no overlap; the matmul pass beside all-reduces with NCCL's defaults, with at most 8
CTAs per NCCL kernel (``--ddp_nccl_ctas 8``), with a high-priority NCCL stream (``--ddp_nccl_high_priority
1``), and with the carveout. "beside" runs enough all-reduces to cover the whole matmul pass, so the
slowdown column is the matmuls' cost of sharing the GPU with NCCL for their whole duration.

Without 2 CUDA GPUs it says so and exits 0.
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visualrwkv.train.strategies import BackwardGemmCarveout  # noqa: E402  (train's --ddp_gemm_sm_carveout)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="processes, one per GPU (0 = every visible GPU)")
    p.add_argument("--tokens", type=int, default=8 * 1977,
                   help="rows of each matmul (a stage-2 micro-batch: 8 x 1977 tokens)")
    p.add_argument("--layers", type=int, default=12, help="layer-shaped groups of matmuls per pass")
    p.add_argument("--bucket_mb", type=int, default=100, help="size of each all-reduce beside the matmuls")
    p.add_argument("--grad_gb", type=float, default=2.98,
                   help="the whole gradient reduced alone (GB, bf16): 1.6B stage 2 with master weights")
    p.add_argument("--carveout", type=int, default=8, help="SMs the carveout rows leave to NCCL")
    p.add_argument("--ctas", type=int, default=8, help="CTAs per NCCL kernel in the limited rows")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _group(ranks: List[int], high_priority: bool = False, max_ctas: int = 0):
    """A new NCCL group over ``ranks`` with its own stream priority and CTA limit (a communicator of its own)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=high_priority)
    if max_ctas:
        opts.config.max_ctas = max_ctas  # NCCL's ncclConfig_t.maxCTAs (NCCL >= 2.17), as NCCL_MAX_CTAS
    key = "pg_options" if "pg_options" in inspect.signature(dist.new_group).parameters else "backend_options"
    return dist.new_group(ranks, backend="nccl", **{key: opts})


class Matmuls:
    """The matmuls of ``layers`` RWKV-6 layers' backward at 2048 x 7168, bf16: (T, 2048) x (2048, 2048) four
    times (time mix), (T, 2048) x (2048, 7168) and (T, 7168) x (7168, 2048) (channel mix)."""

    def __init__(self, tokens: int, layers: int, device: torch.device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        bf = dict(device=device, dtype=torch.bfloat16)
        self.x = torch.randn(tokens, 2048, generator=g, **bf)
        self.h = torch.randn(tokens, 7168, generator=g, **bf)
        self.w_att = torch.randn(2048, 2048, generator=g, **bf) * 0.02
        self.w_key = torch.randn(2048, 7168, generator=g, **bf) * 0.02
        self.w_val = torch.randn(7168, 2048, generator=g, **bf) * 0.02
        self.layers = layers
        self.flops = layers * 2 * tokens * (4 * 2048 * 2048 + 2 * 2048 * 7168)

    def run(self) -> None:
        for _ in range(self.layers):
            for _ in range(4):
                torch.mm(self.x, self.w_att)
            torch.mm(self.x, self.w_key)
            torch.mm(self.h, self.w_val)


def _time(fn, repeats: int) -> float:
    """Median ms of fn() on the current stream (events), after one untimed call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _beside(mm: Matmuls, group, buf: torch.Tensor, n_reduce: int, repeats: int) -> Tuple[float, float]:
    """Median ms of the matmul pass while ``n_reduce`` all-reduces of ``buf`` run on ``group``'s stream, and
    the median ms until the last all-reduce is done (both from the pass's start)."""
    import torch.distributed as dist

    mm_ms, all_ms = [], []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        dist.barrier(group=group)  # both ranks start their all-reduces together
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        works = [dist.all_reduce(buf, group=group, async_op=True) for _ in range(n_reduce)]
        mm.run()
        end.record()
        for w in works:
            w.wait()  # the current stream waits for the NCCL stream
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        torch.cuda.synchronize()
        if i:  # the first is a warm-up
            mm_ms.append(start.elapsed_time(end))
            all_ms.append(start.elapsed_time(done))
    return statistics.median(mm_ms), statistics.median(all_ms)


def agreed_count(n: int, device: torch.device) -> int:
    """The largest of the ranks' ``n``: a count of collectives each rank derives from its own timings must be
    the same on every rank, or the rank that issues more waits forever for partners (r67/r68: the side-by-side
    rows never finished)."""
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _worker(rank: int, world: int, store: str, a: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world, device_id=device)
    say = print if rank == 0 else (lambda *x, **k: None)
    ranks = list(range(world))
    groups: Dict[str, object] = {"NCCL defaults": _group(ranks)}
    try:  # every rank takes the same branch (the same PyTorch), so no rank waits alone in new_group
        groups[f"{a.ctas} CTAs"] = _group(ranks, max_ctas=a.ctas)
        groups[f"{a.ctas} CTAs, high priority"] = _group(ranks, high_priority=True, max_ctas=a.ctas)
    except AttributeError as e:  # a PyTorch built against NCCL < 2.17 has no per-group config
        say(f"# no CTA-limited groups: {e}")
    mm = Matmuls(a.tokens, a.layers, device)
    buf = torch.zeros(a.bucket_mb * 2 ** 20 // 2, device=device, dtype=torch.bfloat16)
    grad = torch.zeros(int(a.grad_gb * 1e9) // 2, device=device, dtype=torch.bfloat16)
    props = torch.cuda.get_device_properties(device)
    nccl = torch.cuda.nccl.version()
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    say(f"# {props.name} x {world}, {props.multi_processor_count} SMs; torch {torch.__version__}, NCCL "
        f"{nccl}; matmul pass: {a.layers} layers x 6 matmuls, "
        f"{a.tokens} tokens, {mm.flops / 1e12:.2f} TFLOP; all-reduces of {a.bucket_mb} MB (bf16)")
    rows: List[Tuple[str, float, str]] = []
    say(f"| {'what':<96} | {'ms':>8} | |")
    say(f"|{'-' * 98}|{'-' * 10}|---|")

    def add(name: str, ms: float, note: str) -> None:  # each row as soon as it is measured (a slow one shows where)
        rows.append((name, ms, note))
        say(f"| {name:<96} | {ms:>8.2f} | {note} |", flush=True)

    alone = _time(mm.run, a.repeats)
    add("matmul pass alone (cuBLAS)", alone, f"{mm.flops / alone / 1e9:.0f} TFLOP/s")
    carveout = BackwardGemmCarveout(a.carveout)
    carveout.enter(device)
    try:
        lt = _time(mm.run, a.repeats)
    finally:
        carveout.exit()
    add(f"matmul pass alone, cuBLASLt leaving {a.carveout} SMs", lt, f"{mm.flops / lt / 1e9:.0f} TFLOP/s")
    for name, g in groups.items():
        one = _time(lambda: dist.all_reduce(buf, group=g), a.repeats)
        busbw = buf.numel() * 2 / (one / 1e3) * 2 * (world - 1) / world / 1e9
        add(f"one {a.bucket_mb} MB all-reduce alone, {name}", one, f"bus {busbw:.0f} GB/s")
    whole = _time(lambda: dist.all_reduce(grad, group=groups["NCCL defaults"]), max(1, a.repeats // 2))
    add(f"the whole {a.grad_gb} GB gradient reduced alone (no overlap), NCCL defaults", whole,
        f"bus {grad.numel() * 2 / (whole / 1e3) * 2 * (world - 1) / world / 1e9:.0f} GB/s")
    # enough all-reduces to outlast the matmul pass even at full speed; every rank must issue the same number
    n_reduce = agreed_count(max(4, int(alone / max(rows[2][1], 1e-3)) + 4), device)
    for name, g in groups.items():
        for sms in (0, a.carveout):
            carveout = BackwardGemmCarveout(sms)  # sms 0: cuBLAS, every SM
            carveout.enter(device)
            try:
                mm_ms, all_ms = _beside(mm, g, buf, n_reduce, a.repeats)
            finally:
                carveout.exit()
            label = f"matmul pass beside {n_reduce} all-reduces, {name}" + (f", leaving {sms} SMs" if sms else "")
            add(label, mm_ms, f"x{mm_ms / alone:.2f} of alone; all-reduces done at {all_ms:.1f} ms")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    a = parse(argv)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = a.gpus or n
    if n < 2 or world < 2 or world > n:
        print(f"bench_overlap.py: needs 2 or more CUDA GPUs (found {n}; --gpus {a.gpus}); nothing to measure here",
              file=sys.stderr)
        return 0
    if not BackwardGemmCarveout.supported():
        print(f"bench_overlap.py: this PyTorch ({torch.__version__}) has no SM carveout for matmuls", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "store"), a), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
