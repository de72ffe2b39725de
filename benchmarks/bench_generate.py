"""Generation speed: our engine (parallel prefill with the image scan + O(1) recurrent decoding)
against the original's way (re-run the whole sequence for every new token), in one process.

    python benchmarks/bench_generate.py                                  # CPU, tiny random model
    python benchmarks/bench_generate.py --device cuda --shape 1.6b       # 1.6B-shaped model, CLIP-L/336 tower, bf16

Random weights (speed does not depend on them). Every row decodes exactly ``--new_tokens`` tokens:
tokens that could end the answer (0 and any token holding a newline) are banned.

Table 1, per batch size: engine prefill time (image tower included) and decode tokens/s (all rows
together), naive tokens/s, speedup. The naive baseline takes the head only at the last position,
so it is already faster than the original (which computed logits everywhere): the speedups shown
are conservative.

Table 2, per context length (batch 1, an image plus text up to the length): engine prefill time,
decode time per token and peak memory; naive time per token (= one full forward) and its peak
memory. Memory is ``torch.cuda.max_memory_allocated`` (weights included); on the CPU it is not
measured.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    # name: (n_layer, n_embd, tower: (hidden, layers, heads, image_size, patch))
    "tiny": (4, 128, (64, 2, 2, 64, 16)),
    "1.6b": (24, 2048, (1024, 24, 16, 336, 14)),  # VisualRWKV-6 1.6B + CLIP ViT-L/14-336
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random VisualRWKV of the given shape, built directly on the device."""
    import transformers

    from visualrwkv.layers.rwkv6 import RWKV6Config
    from visualrwkv.models.rwkv6 import RWKV6
    from visualrwkv.models.visualrwkv import VisualRWKV

    n_layer, n_embd, (vh, vl, vheads, isz, patch) = SHAPES[shape]
    torch.manual_seed(seed)
    with torch.device(device):
        rwkv = RWKV6(RWKV6Config(n_layer=n_layer, n_embd=n_embd))
        vcfg = transformers.CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                                             num_attention_heads=vheads, image_size=isz, patch_size=patch)
        vit = transformers.CLIPVisionModel(vcfg)
        model = VisualRWKV(rwkv, vit, vh, grid_size=-1, num_patches=(isz // patch) ** 2)
    with torch.no_grad():
        for name, p in rwkv.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("time_decay"):
                p.copy_(torch.linspace(-6, -1, p.numel(), device=device).view_as(p))
            elif "time_maa" in name and p.dim() == 3 and p.shape[0] == 1:
                p.uniform_(0, 1)
            elif name.endswith("time_faaaa"):
                p.uniform_(0, 0.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
        model.proj.weight.normal_(0, vh ** -0.5)
    return model.to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def banned_newline_tokens(tok) -> List[int]:
    """Every token that could end an answer: 0 and any token containing a newline."""
    return [0] + [i for i in range(1, 65536) if b"\n" in tok.token_bytes(i)]


@torch.no_grad()
def naive_decode(model, ids: List[int], emb: torch.Tensor, batch: int, n: int, banned: torch.Tensor) -> None:
    """The original's loop: the whole sequence (image spliced) through the model for every token."""
    device = emb.device
    x = torch.tensor([ids] * batch, device=device)
    e = emb.unsqueeze(0).expand(batch, -1, -1)
    for _ in range(n):
        mm = model.build_inputs(x, image_embeds=e)
        h, _ = model.rwkv.forward_hidden(mm.embeds, scan_perm=mm.scan_perm, need_state=False)
        logits = model.rwkv.head(h[:, -1]).float()
        logits[:, banned] = float("-inf")
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)


def note(msg: str) -> None:
    """Progress on stderr (first calls compile and autotune kernels: this shows where the time goes)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_mib(device) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="tiny (CPU default) or 1.6b (GPU default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch_sizes", default="1,64", help="comma-separated (default 1,64)")
    p.add_argument("--text_tokens", type=int, default=48, help="prompt text tokens besides the image (default 48)")
    p.add_argument("--new_tokens", type=int, default=32, help="decoded tokens per row for the engine (default 32)")
    p.add_argument("--naive_tokens", type=int, default=8, help="decoded tokens per row for the naive loop (default 8)")
    p.add_argument("--contexts", default=None,
                   help="context lengths for table 2 (default 1024,8192,24576 on GPU, 512,2048 on CPU; 'none' to skip)")
    p.add_argument("--cuda_graph", default="auto", choices=["auto", "on", "off"], help="engine decoding with CUDA graphs")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step inside its CUDA graph (GPU): fewer, fused kernels")
    p.add_argument("--prefill_runs", type=int, default=10,
                   help="batch-1 prefills timed for the prefill table (eager vs CUDA graphs; 0 skips it)")
    p.add_argument("--profile", action="store_true",
                   help="profile one batch-1 prefill and 16 decoding steps (kernel time by category)")
    a = p.parse_args(argv)

    from visualrwkv.errors import UserError
    from visualrwkv.generation import Engine, GenerationRequest, SamplingParams, resolve_device, resolve_dtype
    from visualrwkv.tokenizer import get_tokenizer

    try:
        device = resolve_device(a.device)
        dtype = resolve_dtype(a.dtype, device)
        batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    except UserError as e:
        print(f"bench_generate: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"bench_generate: bad --batch_sizes {a.batch_sizes!r}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = a.shape or ("1.6b" if device.type == "cuda" else "tiny")
    contexts_arg = a.contexts or ("1024,8192,24576" if device.type == "cuda" else "512,2048")
    contexts = [] if contexts_arg == "none" else [int(x) for x in contexts_arg.split(",")]
    graphs = {"auto": None, "on": True, "off": False}[a.cuda_graph]

    tok = get_tokenizer()
    model = build_model(shape, device, dtype)
    n_params = sum(p.numel() for p in model.rwkv.parameters())
    n_img = model.n_image_tokens
    banned_list = banned_newline_tokens(tok)
    banned = torch.tensor(banned_list, device=device)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(300, 60000, (a.text_tokens,), generator=g).tolist()
    ids = text[:2] + [-200] + text[2:]  # an image near the start, as with image_position 'first'
    isz = model.vit.config.image_size
    px = torch.randn(1, 3, isz, isz, generator=g).to(device, dtype)
    params = SamplingParams.greedy(a.new_tokens, banned_tokens=banned_list)
    engine = Engine(model, tok, prefix_cache_size=0, max_batch_size=max(batch_sizes), cuda_graph=graphs,
                    compile=a.compile)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"VisualRWKV generation benchmark: {dev_name}, {str(dtype).replace('torch.', '')}, shape {shape} "
          f"(RWKV {n_params / 1e6:.0f}M params, {n_img} image tokens), CUDA graphs "
          f"{'on' if engine.graphs is not None else 'off'}, compiled decoding {'on' if a.compile else 'off'}")
    print(f"prompt: {n_img} image + {len(text)} text tokens; engine decodes {a.new_tokens}, naive {a.naive_tokens} "
          "tokens per row\n")

    def engine_run(batch: int):
        """Prefill (tower included) then decode; returns (prefill s, decode tokens/s over all rows)."""
        out = {}

        def prefill():
            emb = engine.encode_images(px)[0]
            reqs = [GenerationRequest(ids, emb, None, params) for _ in range(batch)]
            out["batch"] = b = engine.new_batch()
            b.add(reqs)

        def decode():
            n = 0
            while len(out["batch"]):
                n += len(out["batch"])
                out["batch"].step()
            out["n"] = n

        t_pre = timed(prefill, device)
        t_dec = timed(decode, device)
        return t_pre, out["n"] / t_dec

    rows = []
    for batch in batch_sizes:
        try:
            t0 = time.perf_counter()
            engine_run(batch)  # warm-up (allocator, kernels, graph capture, compilation)
            note(f"batch {batch}: engine warm-up {time.perf_counter() - t0:.1f} s")
            t_pre, tps = engine_run(batch)
            emb = model.encode_images(px)[0]
            t0 = time.perf_counter()
            naive_decode(model, ids, emb, batch, 1, banned)  # warm-up
            note(f"batch {batch}: naive warm-up {time.perf_counter() - t0:.1f} s")
            t_naive = timed(lambda: naive_decode(model, ids, emb, batch, a.naive_tokens, banned), device)
            naive_tps = batch * a.naive_tokens / t_naive
            rows.append((batch, t_pre * 1e3, tps, naive_tps, tps / naive_tps))
        except torch.OutOfMemoryError:
            rows.append((batch, None, None, None, None))
        reset_peak(device)
    print("| batch | engine prefill (ms) | engine decode (tokens/s) | naive (tokens/s) | speedup |")
    print("|---:|---:|---:|---:|---:|")
    for batch, pre, tps, ntps, sp in rows:
        print(f"| {batch} | {fmt(pre)} | {fmt(tps)} | {fmt(ntps)} | {fmt(sp, '.1f')}x |")

    if a.prefill_runs > 0:
        # Batch-1 prefill (tower + prompt -> first-token logits and state), the engine as configured
        # against the same engine without CUDA graphs, median of --prefill_runs each.
        eager = Engine(model, tok, prefix_cache_size=0, max_batch_size=1, cuda_graph=False)

        def one_prefill(eng):
            emb = eng.encode_images(px)[0]
            b = eng.new_batch()
            b.add([GenerationRequest(ids, emb, None, params)])
            return b

        res = {}
        for name, eng in (("eager", eager), ("engine", engine)):
            one_prefill(eng)  # warm-up (captures the graphs)
            ts = sorted(timed(lambda: one_prefill(eng), device) for _ in range(a.prefill_runs))
            res[name] = ts[len(ts) // 2] * 1e3
        print(f"\nprefill, batch 1, {n_img} image + {len(text)} text tokens, vision tower included "
              f"(median of {a.prefill_runs})")
        print("| path | ms |\n|---|---:|")
        print(f"| eager (no graphs) | {res['eager']:.1f} |")
        print(f"| engine (CUDA graphs {'on' if engine.graphs is not None else 'off'}) | {res['engine']:.1f} |")

    if a.profile and device.type == "cuda":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_profile import profile_table

        emb1 = engine.encode_images(px)[0]

        def prof_prefill():
            b = engine.new_batch()
            b.add([GenerationRequest(ids, emb1, None, params)])

        print()
        print(profile_table(lambda: engine.encode_images(px), label="vision tower, 1 image", repeat=5))
        print()
        print(profile_table(prof_prefill, label="prefill of the prompt (tower excluded), batch 1", repeat=5))
        b = engine.new_batch()
        b.add([GenerationRequest(ids, emb1, None, SamplingParams.greedy(10 ** 6, banned_tokens=banned_list))])
        for _ in range(3):
            b.step()
        print()
        print(profile_table(b.step, label="one decoding step, batch 1 (engine loop included)", repeat=16))

    if contexts:
        print(f"\ncontext length sweep (batch 1; engine decodes {a.new_tokens} tokens, naive runs one full forward)")
        print("| context | engine prefill (s) | engine decode (ms/token) | engine peak (MiB) "
              "| naive (ms/token) | naive peak (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for T in contexts:
            n_text = max(4, T - n_img)
            long_text = torch.randint(300, 60000, (n_text,), generator=g).tolist()
            long_ids = long_text[:2] + [-200] + long_text[2:]
            res = [T]
            try:
                reset_peak(device)
                out = {}

                def prefill():
                    emb = model.encode_images(px)[0]
                    out["b"] = b = engine.new_batch()
                    b.add([GenerationRequest(long_ids, emb, None, params)])

                def decode():
                    while len(out["b"]):
                        out["b"].step()

                t_pre = timed(prefill, device)
                t_dec = timed(decode, device)
                res += [t_pre, t_dec / a.new_tokens * 1e3, peak_mib(device)]
            except torch.OutOfMemoryError:
                res += [None, None, None]
            out.clear()
            try:
                reset_peak(device)
                emb = model.encode_images(px)[0]
                t_naive = timed(lambda: naive_decode(model, long_ids, emb, 1, 1, banned), device)
                res += [t_naive * 1e3, peak_mib(device)]
            except torch.OutOfMemoryError:
                res += [None, None]
            T, pre, dms, epk, nms, npk = res
            print(f"| {T} | {fmt(pre, '.3f')} | {fmt(dms, '.2f')} | {fmt(epk, '.0f')} | {fmt(nms, '.1f')} "
                  f"| {fmt(npk, '.0f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
