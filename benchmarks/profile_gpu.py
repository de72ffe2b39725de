"""Profile the 1.6B-shaped RWKV-6 on a GPU: where a stage-1-like forward+backward and a decode step
spend their time (torch.profiler tables), to guide optimisation.

    python benchmarks/profile_gpu.py [--layers 24 --width 2048 --batch 16 --tokens 650]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from visualrwkv.models.rwkv6 import RWKV6, RWKV6Config  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=650)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_gpu: needs a CUDA GPU")
        return 1
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    model = RWKV6(RWKV6Config(n_layer=a.layers, n_embd=a.width)).init_weights(0).to(dev, torch.bfloat16)
    model.requires_grad_(False)
    x = (torch.randn(a.batch, a.tokens, a.width, device=dev, dtype=torch.bfloat16) * 0.1).requires_grad_()

    def step():
        h, _ = model.forward_hidden(x, need_state=False)
        h[:, -40:].float().square().mean().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 5
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    print(f"stage-1-like fwd+bwd (input grads only), B={a.batch} T={a.tokens}: {dt * 1e3:.1f} ms, "
          f"{a.batch / dt:.1f} samples/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(tab)
    with open(os.path.join(a.out, "profile_stage1.txt"), "w") as f:
        f.write(tab)
    # Decode step, batch 1, eager.
    with torch.no_grad():
        _, st = model(torch.zeros(1, 8, dtype=torch.long, device=dev))
        tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        for _ in range(5):
            _, st = model(tok, state=st)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            _, st = model(tok, state=st)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 50
    print(f"eager decode step batch 1: {dt * 1e3:.2f} ms = {1 / dt:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
