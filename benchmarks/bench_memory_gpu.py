"""Decoding memory and speed against context length: RWKV-6 1.6B shape (recurrent state) vs a
same-size Llama with a KV cache (transformers), both random weights, bf16, batch 1, one GPU.

    python benchmarks/bench_memory_gpu.py [--contexts 1024 8192 24576 --new_tokens 64]

For each context: prefill the context, then decode ``new_tokens`` greedily; report peak memory
(torch.cuda.max_memory_allocated, weights included), prefill time and decode tokens/s.
RWKV decodes with the CUDA-graph decoder; Llama with HF's KV cache (eager generate loop).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def measure(prefill, decode, new_tokens):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ctx = prefill()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    decode(ctx, new_tokens)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return torch.cuda.max_memory_allocated() / 2**30, (t1 - t0), new_tokens / (t2 - t1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 24576])
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--skip_llama", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_memory_gpu: needs a CUDA GPU; none is visible.")
        return 1
    from visualrwkv.generation.cuda_graph import GraphedDecoder
    from visualrwkv.models.rwkv6 import RWKV6, RWKV6Config

    dev = "cuda"
    rows = []
    with torch.device(dev):
        rwkv = RWKV6(RWKV6Config(n_layer=24, n_embd=2048)).init_weights(0).to(torch.bfloat16).eval()
    n_rwkv = sum(p.numel() for p in rwkv.parameters())
    dec = GraphedDecoder(rwkv, 1)
    for T in a.contexts:
        ids = torch.randint(0, 65536, (1, T), device=dev)

        def prefill():
            with torch.no_grad():
                out, st = None, None
                for s in range(0, T, 4096):  # chunked prefill: activation memory bounded by the chunk
                    out, st = rwkv(ids[:, s:s + 4096], state=st, last_only=True)
                return out, st

        def decode(ctx, n):
            logits, st = ctx
            dec.load_state(st)
            tok = logits.argmax(-1)
            for _ in range(n):
                tok = dec.step(tok).argmax(-1)

        rows.append(("RWKV-6 1.6B (state)", n_rwkv, T) + measure(prefill, decode, a.new_tokens))
    del rwkv, dec
    if not a.skip_llama:
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=65536,
                                       max_position_embeddings=32768)
        with torch.device(dev):  # built on the GPU: seconds instead of a minute of CPU init
            llama = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        n_llama = sum(p.numel() for p in llama.parameters())
        for T in a.contexts:
            ids = torch.randint(0, 65536, (1, T), device=dev)

            def prefill():
                with torch.no_grad():
                    out = llama(ids, use_cache=True, logits_to_keep=1)
                    return out.logits[:, -1], out.past_key_values

            def decode(ctx, n):
                logits, past = ctx
                tok = logits.argmax(-1, keepdim=True)
                with torch.no_grad():
                    for _ in range(n):
                        out = llama(tok, past_key_values=past, use_cache=True)
                        past = out.past_key_values
                        tok = out.logits[:, -1].argmax(-1, keepdim=True)

            try:
                rows.append(("Llama 1.4B (KV cache, HF)", n_llama, T) + measure(prefill, decode, a.new_tokens))
            except torch.OutOfMemoryError:
                rows.append(("Llama 1.4B (KV cache, HF)", n_llama, T, float("nan"), float("nan"), float("nan")))
    print(f"\n{torch.cuda.get_device_name()}, bf16, batch 1, {a.new_tokens} new tokens after the context")
    print("| model | params | context | peak memory (GiB) | prefill (s) | decode (tokens/s) |")
    print("|---|---|---|---|---|---|")
    for name, n, T, mem, pre, tps in rows:
        print(f"| {name} | {n / 1e9:.2f}B | {T} | {mem:.2f} | {pre:.3f} | {tps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
