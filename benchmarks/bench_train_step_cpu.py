"""Training-step rate of a quickstart-sized model on the CPU (4 x 128 RWKV-6, vocab 65536, a 2-layer
32 px CLIP tower, frozen; micro-batch 16 of 16 image + 20-40 text tokens; fp32; AdamW): the model's
forward, backward and optimizer step without Lightning or data loading, for A/B runs of two checkouts
on a shared, noisy CPU. Run each checkout several times, interleaved, and compare medians:

    python benchmarks/bench_train_step_cpu.py                              # this checkout
    for i in 1 2 3 4 5; do for d in . ../other; do PYTHONPATH=$d python benchmarks/bench_train_step_cpu.py --label $d; done; done

Prints one line: label, steps/s and samples/s over --seconds of steps after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seconds", type=float, default=12.0, help="timed steps run this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="this checkout")
    a = p.parse_args(argv)
    import transformers

    from visualrwkv.layers.rwkv6 import RWKV6Config
    from visualrwkv.models.rwkv6 import RWKV6
    from visualrwkv.models.visualrwkv import VisualRWKV

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    rwkv = RWKV6(RWKV6Config(n_layer=4, n_embd=128, vocab_size=65536)).init_weights(0)
    vcfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)
    model = VisualRWKV(rwkv, transformers.CLIPVisionModel(vcfg), 64, grid_size=-1, num_patches=16).train()
    model.freeze_vit = True
    for prm in list(model.vit.parameters()) + [model.rwkv.emb.weight]:
        prm.requires_grad_(False)
    opt = torch.optim.AdamW([prm for prm in model.parameters() if prm.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    B, batches = 16, []
    for _ in range(4):
        lens = torch.randint(20, 40, (B,), generator=g)
        ids = torch.randint(1, 65000, (B, int(lens.max())), generator=g)
        ids[:, 0] = -200  # the image first, as the quickstart's prompts
        labels = ids.clone()
        labels[:, :8] = -100
        for b in range(B):
            ids[b, lens[b]:] = 0
            labels[b, lens[b]:] = -100
        batches.append(dict(input_ids=ids, labels=labels, lengths=lens,
                            pixel_values=torch.randn(B, 3, 32, 32, generator=g)))

    def step(batch):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches:
        step(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        step(batches[n % len(batches)])
        n += 1
    rate = n / (time.perf_counter() - t0)
    print(f"{a.label}: {rate:.2f} steps/s, {rate * B:.1f} samples/s ({a.threads} threads)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
