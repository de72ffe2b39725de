"""Training-step throughput of VisualRWKV on one CUDA GPU: stage 1 (projector only) and stage 2
(everything but the token embedding and the frozen tower, AdamW), at a 1.6B shape.

Model: RWKV-6 24 layers x 2048, vocab 65536, random weights (RWKV6Config + init_weights), and a
random CLIP ViT-L/14-336-shaped tower (1024 wide, 24 layers, 577 tokens; grid_size -1, so 577
image tokens per sample). Each sample is an image plus ``text_len`` text tokens, the image after
the first quarter of the text (as with ``--image_position middle``), loss on the last half.

    python benchmarks/bench_train_gpu.py                               # default grid
    python benchmarks/bench_train_gpu.py --micro_bsz 8,16 --text_len 128,512 --stages 2
    python benchmarks/bench_train_gpu.py --lightning                   # through pl.Trainer as 'visualrwkv train'
    python benchmarks/bench_train_gpu.py --lightning --devices 2       # DDP on 2 GPUs (samples/s over both)
    python benchmarks/bench_train_gpu.py --ragged --pack 0             # padded batches, padding computed
    python benchmarks/bench_train_gpu.py --compile 1 --grad_cp 1       # torch.compile'd blocks, checkpointing
    python benchmarks/bench_train_gpu.py --stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 \
        --lengths_from benchmarks/data/llava_sample_lengths.json --batches 8   # real record lengths, 8 batches
    python benchmarks/bench_train_gpu.py --fla_sync_free 0             # fla's own state pass (host syncs)
    python benchmarks/bench_train_gpu.py --stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged \
        --grad_cp 0 --compile 1 --act_budget 0.5 --master_weights 1 --lightning
                                  # the fastest stage 2, as 'visualrwkv train --master_weights 1' runs it
                                  # (+ --inductor coordinate_descent_tuning=1: train --tune_kernels 1)
    python benchmarks/bench_train_gpu.py --stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged \
        --grad_cp 0 --compile 1 --act_budget 0.5 --master_weights 1 --lightning --devices 4
                                  # DDP scaling (run --devices 1 beside it; allow ~2 min of start-up)
    python benchmarks/bench_train_gpu.py ... --host_profile 3          # is the step bound by the host? (cProfile)
    python benchmarks/bench_train_gpu.py --tiny                        # small model, runs on the CPU (smoke check)

``benchmarks/data/llava_sample_lengths.json`` holds the text lengths of the 1000 records of the original
project's sample data (``../shared/data/llava_sample/dummy.json``), made with ``length_pool`` here:
short QA turns, median 87 text tokens, so it is lighter than the uniform 100..1400 of ``--ragged``.

One step = forward + backward + gradient clipping (1.0) + AdamW step, with the precision of
``visualrwkv train --precision bf16`` (bf16 autocast, fp32 master weights; ``--precision bf16-true``
keeps the weights in bf16). Timing: ``--warmup`` steps, then ``--steps`` timed steps between two
``cuda.synchronize()`` calls. Prints one table row per (stage, micro_bsz, text_len): step time,
samples/s, tokens/s (real tokens with the image tokens, padding not counted) and peak GPU memory.
With ``--lightning`` each rank also prints where its timed steps' device time went (CUDA events around the
forward, the backward, the rest of the step and the time between steps: no profiler overhead) and, on a GPU,
every host-device synchronisation of one more step with the code outside torch that led to it.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visualrwkv.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from visualrwkv.train.config import TrainConfig  # noqa: E402  (its defaults are the DDP flags' defaults)


def ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro_bsz", type=ints, default=[8, 16], help="comma-separated micro-batch sizes")
    p.add_argument("--text_len", type=ints, default=[128, 512], help="comma-separated text lengths (tokens)")
    p.add_argument("--stages", type=ints, default=[1, 2], help="1 = projector only, 2 = all but the embedding")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (kernels, allocator, autotuning)")
    p.add_argument("--precision", choices=["bf16-mixed", "bf16-true"], default="bf16-mixed")
    p.add_argument("--grad_cp", type=int, choices=[0, 1], default=0, help="gradient checkpointing per block")
    p.add_argument("--backend", default="auto", help="WKV6 backend of the model (auto, fla, chunked, ...)")
    p.add_argument("--pack", type=int, choices=[0, 1], default=1,
                   help="1: packed rows (the training default on CUDA); with --ragged it skips the padding")
    p.add_argument("--ragged", action="store_true",
                   help="samples of different lengths (text_min .. text_len), so a batch has padding")
    p.add_argument("--text_min", type=int, default=None,
                   help="shortest text with --ragged (default text_len/2); lengths are uniform in [text_min, text_len]")
    p.add_argument("--batches", type=int, default=1,
                   help="distinct random micro-batches the steps cycle through (1: the same batch every step)")
    p.add_argument("--lengths_from", default=None,
                   help="draw the text lengths from real data: a LLaVA JSON data file (tokenised as training does) "
                        "or a JSON list of token counts; clipped to --text_min..--text_len")
    p.add_argument("--compile", type=int, choices=[0, 1], default=0, help="torch.compile the RWKV blocks")
    p.add_argument("--compile_vit", type=int, choices=[0, 1], default=1,
                   help="with --compile 1: also compile the frozen vision tower (1, as 'visualrwkv train --compile 1'); "
                        "0: eager tower (the baseline)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step: kernel time by category (gpu_profile.py); with "
                        "--lightning one more step through the Trainer (rank 0 under DDP: the all-reduce's "
                        "kernel time and how much of it no compute overlaps)")
    p.add_argument("--profile_top", type=int, default=12, help="kernels listed by --profile")
    p.add_argument("--host_profile", type=int, default=0, metavar="N",
                   help="plain loop: cProfile the host side of N more steps (no syncs inside) and print the "
                        "functions with the most own time: where a launch-bound step spends its CPU time")
    p.add_argument("--act_budget", type=float, default=None,
                   help="with --compile 1: torch._functorch activation_memory_budget (0..1); below 1 the compiled "
                        "graphs recompute their cheapest ops in backward instead of saving them")
    p.add_argument("--fused_norm_gate", type=int, choices=[0, 1], default=1,
                   help="with --compile 1: ln_x and the gate product as fused Triton kernels (ops/norm_gate.py; "
                        "the default of train --compile 1); 0: inductor's GroupNorm (the baseline)")
    p.add_argument("--wkv_op", type=int, choices=[0, 1], default=1,
                   help="with --compile 1: packed WKV calls as custom ops inside the compiled graphs (1, the "
                        "default of train --compile 1) or behind a graph break (0, the baseline)")
    p.add_argument("--wkv_keep", type=int, choices=[0, 1], default=1,
                   help="with --wkv_op 1: the WKV forward keeps fla's chunk states and cumulative decays for the "
                        "backward (1, as train's --wkv_keep_states 1) or the backward computes them again as fla "
                        "does (0, the baseline)")
    p.add_argument("--act_estimator", choices=["flops", "profile"], default="flops",
                   help="with --act_budget: how the partitioner prices recomputation (torch._functorch "
                        "activation_memory_budget_runtime_estimator): flop counts (elementwise ops look free) "
                        "or timing each op on the GPU")
    p.add_argument("--fused_mix", type=int, choices=[0, 1], default=0,
                   help="with --compile 1: the time mixing's LoRA output and five interpolations as ops/maa_mix.py's "
                        "fused Triton kernels (1; opt-in until measured) or the bmm + inductor's kernels (0)")
    p.add_argument("--master_weights", type=int, choices=[0, 1], default=0,
                   help="1: trainable linear weights in bf16 with fp32 masters in the optimizer (train's "
                        "--master_weights 1: no weight casts per step); 0: fp32 weights under autocast")
    p.add_argument("--host_numbers", type=int, choices=[0, 1], default=1,
                   help="plain loop: the splicing's numbers computed from the CPU batch beforehand (1, as "
                        "'visualrwkv train' does) or read back from the GPU in every step (0: the baseline)")
    p.add_argument("--skip_guards", type=int, choices=[0, 1], default=0,
                   help="with --compile 1, plain loop: the timed steps under torch.compiler.set_stance("
                        "skip_guard_eval_unsafe=True) (1; only the guards that tell compiled graphs apart are "
                        "checked) to measure what dynamo's guard checks cost per step; 0: as training runs")
    p.add_argument("--alloc", default="",
                   help="CUDA caching-allocator settings for this run, e.g. expandable_segments:True "
                        "(torch.cuda.memory._set_allocator_settings, before the first allocation)")
    p.add_argument("--inductor", default="",
                   help="with --compile 1: comma-separated torch._inductor.config settings, e.g. "
                        "coordinate_descent_tuning=1,max_autotune=1 (ints, floats and words as given)")
    p.add_argument("--fla_sync_free", type=int, choices=[0, 1], default=1,
                   help="packed fla calls size their state buffer and get their chunk tables from host numbers "
                        "(1, default) or use fla's own GPU read-backs (0: the baseline of "
                        "visualrwkv.ops.fla_varlen)")
    p.add_argument("--devices", type=int, default=1,
                   help="GPUs (with --lightning): > 1 runs DDP, one process per GPU, each with --micro_bsz")
    p.add_argument("--ddp", type=int, choices=[0, 1], default=0,
                   help="with --lightning: 1 wraps the model in DDP also on one GPU (DDP's own cost with no partner "
                        "to wait for; its compiled graphs, split at the buckets, are those of --devices 2 and 4)")
    p.add_argument("--ddp_bucket_mb", type=int, default=TrainConfig.ddp_bucket_mb,
                   help="with --devices > 1 or --ddp 1: all-reduce bucket size in MB (train --ddp_bucket_mb; default 100, "
                        "buckets overlapping the backward; 0 = the whole gradient in one all-reduce after it; "
                        "25 = torch DDP's own)")
    p.add_argument("--ddp_nccl_high_priority", type=int, choices=[0, 1], default=TrainConfig.ddp_nccl_high_priority,
                   help="with --devices > 1: NCCL on a high-priority stream (train --ddp_nccl_high_priority, "
                        "default 1; 0 = PyTorch's default)")
    p.add_argument("--ddp_nccl_ctas", type=int, default=TrainConfig.ddp_nccl_ctas,
                   help="with --devices > 1: at most this many CTAs per NCCL kernel (train --ddp_nccl_ctas; default "
                        "-1 = 8 with overlapping buckets, NCCL's choice with one bucket; 0 = NCCL's choice)")
    p.add_argument("--ddp_gemm_sm_carveout", type=int, default=TrainConfig.ddp_gemm_sm_carveout,
                   help="with --devices > 1 or --ddp 1: the backward's matmuls leave this many SMs to the "
                        "all-reduces (train --ddp_gemm_sm_carveout; 0 = every SM)")
    p.add_argument("--ddp_avg_in_allreduce", type=int, choices=[0, 1], default=TrainConfig.ddp_avg_in_allreduce,
                   help="with --devices > 1 or --ddp 1: average in NCCL's all-reduce (train --ddp_avg_in_allreduce, "
                        "default 1; 0 = DDP's division of every gradient)")
    p.add_argument("--lightning_sigterm", action="store_true",
                   help="with --devices > 1: baseline with Lightning's own SIGTERM check at each step's start (a "
                        "broadcast read back with .item(): the host waits for the GPU every step) instead of "
                        "train's lagged one (train/strategies.py::LaggedSigtermCheck)")
    p.add_argument("--ddp_grad_dtype", choices=["fp32", "bf16"], default=TrainConfig.ddp_grad_dtype,
                   help="with --devices > 1: gradient all-reduce dtype (train --ddp_grad_dtype; fp32 = the baseline)")
    p.add_argument("--lightning", action="store_true",
                   help="run the steps through lightning's Trainer with the module of 'visualrwkv train'")
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--tiny", action="store_true",
                   help="2 x 64 model, vocab 1024, 32 px tower; runs on the CPU in fp32 (a smoke check, not a benchmark)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
def build_model(a: argparse.Namespace, device: torch.device):
    import transformers

    from visualrwkv.layers.rwkv6 import RWKV6Config
    from visualrwkv.models.rwkv6 import RWKV6
    from visualrwkv.models.visualrwkv import VisualRWKV

    transformers.logging.set_verbosity_error()
    if a.tiny:
        cfg = RWKV6Config(n_layer=2, n_embd=64, vocab_size=1024)
        vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    else:
        cfg = RWKV6Config(n_layer=a.n_layer, n_embd=a.n_embd, vocab_size=a.vocab_size)
        vcfg = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=336, patch_size=14)
    torch.manual_seed(0)
    with torch.device(device):  # build and initialise on the device: seconds instead of a minute on a CPU
        rwkv = RWKV6(cfg).init_weights(0)
        vit = transformers.CLIPVisionModel(vcfg)
    model = VisualRWKV(rwkv, vit, vcfg.hidden_size, grid_size=-1, num_patches=(vcfg.image_size // vcfg.patch_size) ** 2)
    dtype = torch.bfloat16 if a.precision == "bf16-true" and not a.tiny else torch.float32
    return model.to(device=device, dtype=dtype), vcfg


def freeze(model, stage: int) -> List[torch.nn.Parameter]:
    """Stage 1: projector; stage 2: projector + blocks + ln_out + head (never emb, never the tower)."""
    model.requires_grad_(False)
    model.proj.requires_grad_(True)
    if stage == 2:
        model.rwkv.blocks.requires_grad_(True)
        model.rwkv.ln_out.requires_grad_(True)
        model.rwkv.head.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(B: int, text_len: int, image_size: int, vocab: int, device, gen: torch.Generator,
               ragged: bool = False, text_min: Optional[int] = None, pool: Optional[List[int]] = None) -> Dict:
    """B samples of text_len ids (ragged: text_min .. text_len; pool: lengths drawn from this list,
    clipped to text_min .. text_len; right-padded with 0) with one image placeholder in the first
    quarter of the shortest row; labels on the last half of each sample.
    Shapes: input_ids/labels (B, W), lengths (B,), pixel_values (B, 3, S, S); W = longest row."""
    lo = text_len // 2 if text_min is None else min(text_min, text_len)
    lo = max(lo, max(1, text_len // 4) + 1) if pool is None else max(lo, 2)  # room for the placeholder
    if pool is not None:
        picks = torch.randint(0, len(pool), (B,), generator=gen)
        lengths = torch.tensor([min(max(pool[i], lo), text_len) for i in picks.tolist()]) + 1
        ids = torch.randint(1, vocab, (B, int(lengths.max())), generator=gen)
    else:
        ids = torch.randint(1, vocab, (B, text_len + 1), generator=gen)
        if ragged:
            lengths = torch.randint(lo, text_len + 1, (B,), generator=gen) + 1
            lengths[0] = text_len + 1  # the longest sets the padded width
        else:
            lengths = torch.full((B,), text_len + 1, dtype=torch.long)
    pos = max(1, (text_len if pool is None else int(lengths.min()) - 1) // 4)
    ids[:, pos] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    for b in range(B):
        n = int(lengths[b])
        ids[b, n:] = 0
        labels[b, n:] = IGNORE_INDEX
        labels[b, : n // 2] = IGNORE_INDEX
    labels[:, pos] = IGNORE_INDEX
    return {"input_ids": ids.to(device), "labels": labels.to(device), "lengths": lengths.to(device),
            "has_image": torch.ones(B, dtype=torch.bool, device=device),
            "pixel_values": torch.randn(B, 3, image_size, image_size, generator=gen).to(device)}


def lengths_desc(a: argparse.Namespace) -> str:
    if a.lengths_from:
        return f"text lengths of {os.path.basename(a.lengths_from)} clipped to {a.text_min or 'text_len/2'}..text_len"
    return f"ragged (text {a.text_min or 'text_len/2'}..text_len)" if a.ragged else "equal"


def length_pool(path: str) -> List[int]:
    """Text lengths in tokens (the image placeholder counted once) from a JSON list of ints, or from
    a LLaVA data file tokenised with the training prompt format (image in the middle)."""
    import json

    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data:
        raise ValueError("expected a non-empty JSON list of LLaVA records or of token counts")
    if all(isinstance(x, int) for x in data):
        return list(data)
    from visualrwkv.data.conversation import tokenize_record
    from visualrwkv.tokenizer import get_tokenizer

    tok = get_tokenizer()
    return [len(tokenize_record(r, tok, image_position="middle")[0]) for r in data]


def inductor_settings(spec: str) -> None:
    """Apply ``key=value,...`` to torch._inductor.config (values: int, float, else the word)."""
    from torch._inductor import config as inductor_config

    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, raw = item.partition("=")
        obj, _, attr = key.rpartition(".")
        target = inductor_config
        for part in filter(None, obj.split(".")):
            target = getattr(target, part)
        if not hasattr(target, attr):
            raise SystemExit(f"bench_train_gpu.py: --inductor {item}: torch._inductor.config has no {key}")
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        else:
            value = raw
        setattr(target, attr, value)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
def time_raw(model, params, batches, a, device) -> float:
    """Seconds per step of a plain loop doing what Lightning's automatic optimization does."""
    # As module.py: fused AdamW on CUDA; bf16 needs no gradient scaler, so the clipping is exact
    # and folded into the fused step.
    from visualrwkv.train.optim import MasterAdamW, clip_grad_norm_in_step_

    hp = dict(lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    if a.master_weights:
        opt = MasterAdamW(params, **hp)
    else:
        opt = torch.optim.AdamW(params, **hp, **({"fused": True} if device.type == "cuda" else {}))
    in_step = getattr(opt, "_step_supports_amp_scaling", False)  # clipping folded into the step
    autocast = device.type == "cuda" and a.precision == "bf16-mixed"

    turn = [0]

    def step():
        batch = batches[turn[0] % len(batches)]
        turn[0] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                        lengths=batch["lengths"], backend=a.backend, pack=bool(a.pack),
                        splice_numbers=batch["splice_numbers"] if a.host_numbers else None)
        out.loss.backward()
        if in_step:
            clip_grad_norm_in_step_(opt, params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(a.warmup):
        t = time.perf_counter()
        step()
        sync(device)
        print(f"  warm-up step {i + 1}: {time.perf_counter() - t:.1f} s (kernel compilation, autotuning)", file=sys.stderr,
              flush=True)
    def stance():
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if a.skip_guards \
            else contextlib.nullcontext()

    before = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    with stance():
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        host = (time.perf_counter() - t0) / a.steps
        state = gpu_state(device)  # the GPU is still working through the queued steps
        sync(device)
        dt = (time.perf_counter() - t0) / a.steps
    print(f"  GPU near the end of the timed steps: {state}", file=sys.stderr, flush=True)
    # Nothing in the loop waits for the GPU, so the host's time to queue a step is its launch cost: when it
    # is close to the step time, the step is bound by the CPU (Python, launches), not by the GPU's kernels.
    print(f"  host time to queue one step: {host * 1e3:.1f} ms of {dt * 1e3:.1f} ms", file=sys.stderr, flush=True)
    if device.type == "cuda":
        # cudaMalloc / cudaFree calls by the caching allocator in the timed steps: a cudaFree (after a
        # failed allocation, "retries") waits for the whole GPU, so each one leaves it idle.
        after = torch.cuda.memory_stats(device)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_device_alloc", "num_device_free",
                                                                     "num_alloc_retries")}
        print(f"  allocator in {a.steps} timed steps: {moved['num_device_alloc']} cudaMalloc, "
              f"{moved['num_device_free']} cudaFree, {moved['num_alloc_retries']} retries", file=sys.stderr,
              flush=True)
    if a.host_profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        # The backward's Python (custom ops' backward, compiled graphs' wrappers) normally runs on autograd's
        # device thread, which cProfile does not see; without autograd's threads it runs on this one.
        with stance(), torch.autograd.set_multithreading_enabled(False):
            prof.enable()
            for _ in range(a.host_profile):
                step()
            prof.disable()
            sync(device)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
        pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(40)
        print(f"host profile of {a.host_profile} steps (cProfile, backward on this thread; own time, then time "
              f"with callees):", flush=True)
        print("\n".join(line[:220] for line in text.getvalue().splitlines() if line.strip()), flush=True)
        if device.type == "cuda":
            # The same steps as torch.profiler sees them on the CPU, every thread: operators by own CPU time.
            from torch.profiler import ProfilerActivity, profile

            with stance(), profile(activities=[ProfilerActivity.CPU]) as tprof:
                for _ in range(a.host_profile):
                    step()
                sync(device)
            print(f"host operators over {a.host_profile} steps (torch.profiler, CPU):", flush=True)
            print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90),
                  flush=True)
    if a.profile and device.type == "cuda":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_profile import count_syncs, profile_table

        with stance():
            print(count_syncs(step), flush=True)
            print(profile_table(step, label=f"one training step ({a.precision}, grad_cp {a.grad_cp}, "
                                            f"compile {a.compile})", top=a.profile_top), flush=True)
    del opt
    return dt


def gpu_state(device) -> str:
    """The card's clocks, power, temperature and active clock-throttle reasons now (nvidia-smi), read while the
    timed steps still run: tells a slow run on a throttled card from one slowed by the software."""
    import subprocess

    if device.type != "cuda":
        return "n/a (not a CUDA device)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # nvidia-smi numbers the cards as the machine does
        index = visible.split(",")[index].strip()
    fields = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = out.stdout.strip() or out.stderr.strip()
    return f"{fields} = {text}"


class GCClock:
    """Time spent in Python's cyclic garbage collector between start() and stop() (gc.callbacks): a
    host-bound step whose process holds many objects (a fresh torch.compile leaves millions) may pay here."""

    def __init__(self):
        self.total, self.count, self.by_gen, self._t = 0.0, 0, [0, 0, 0], None

    def _cb(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.total += time.perf_counter() - self._t
            self.count += 1
            self.by_gen[info["generation"]] += 1
            self._t = None

    def start(self):
        gc.callbacks.append(self._cb)

    def stop(self):
        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)

    def report(self, steps: int) -> str:
        return (f"{self.total * 1e3 / steps:.2f} ms per step in {self.count} collections (generations 0/1/2: "
                f"{'/'.join(map(str, self.by_gen))}); {len(gc.get_objects())} tracked objects")


class PhaseClock:
    """When each part of the timed Lightning steps ran on the device and on the host, without a profiler's overhead.

    CUDA events recorded on the current stream at the start of each step, before and after its backward and
    at its end (no synchronisation: read after the timed steps' final sync); the host clock on a CPU. Under
    DDP the backward's span includes waiting for the gradient all-reduce (DDP's reducer makes the stream
    wait for it before the backward returns); "between steps" is device time outside Lightning's step hooks
    (the next batch's copy to the GPU, the loop's own work, or the GPU idle waiting for the host).
    On CUDA each mark also takes the host clock and asks whether the stream had already run everything queued
    before it (``Stream.query``, which does not wait): a drained stream at a mark means the GPU was idle,
    waiting for the host, so the host's time of the part before it is what the step costs there.
    """

    parts = {"forward + loss": ("start", "backward"), "backward": ("backward", "after_backward"),
             "optimizer + rest of the step": ("after_backward", "end")}

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: List[Dict[str, Any]] = []

    def mark(self, name: str) -> None:
        host = time.perf_counter()
        if self.cuda:
            drained = torch.cuda.current_stream().query()
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            drained, stamp = False, host
        if name == "start":
            self.steps.append({})
        if self.steps:
            self.steps[-1][name] = (stamp, host, drained)

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def _done(self) -> List[Dict[str, Any]]:
        return [s for s in self.steps if len(s) == 4]

    def means(self, clock: int = 0) -> Dict[str, float]:
        """Mean ms per timed step of each part (clock 0: the device's events, read after the device has
        finished the steps; 1: the host's clock)."""
        done = self._done()
        ms = self._ms if clock == 0 else (lambda x, y: (y - x) * 1e3)
        out = {k: statistics.mean(ms(s[a][clock], s[b][clock]) for s in done) for k, (a, b) in self.parts.items()}
        gaps = [ms(x["end"][clock], y["start"][clock]) for x, y in zip(done, done[1:])]
        out["between steps"] = statistics.mean(gaps) if gaps else 0.0
        return out

    def drained(self) -> Dict[str, float]:
        """Share of the timed steps in which the stream had run out of work at each mark."""
        done = self._done()
        return {name: sum(s[name][2] for s in done) / len(done) for name in ("start", "backward", "after_backward",
                                                                             "end")} if done else {}

    def report(self) -> str:
        m = self.means()
        text = ", ".join(f"{k} {v:.1f}" for k, v in m.items()) + f" (sum {sum(m.values()):.1f} ms)"
        if self.cuda and self._done():
            h = self.means(clock=1)
            text += "; on the host: " + ", ".join(f"{k} {v:.1f}" for k, v in h.items()) + \
                f" (sum {sum(h.values()):.1f} ms); GPU out of work at " + \
                ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.drained().items()) + " of the steps"
        return text


def uses_ddp(a: argparse.Namespace) -> bool:
    """Whether the Lightning run wraps the model in DDP: several GPUs, or --ddp 1 on one."""
    return a.devices > 1 or bool(a.ddp)


def time_lightning(model, batches, a, device) -> float:
    """Seconds per step through pl.Trainer with VisualRWKVTrainModule (the 'visualrwkv train' step)."""
    import lightning.pytorch as pl

    from visualrwkv.train.cli import make_strategy
    from visualrwkv.train.module import VisualRWKVTrainModule

    cpu = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    profiled = a.profile and device.type == "cuda"
    counted = device.type == "cuda"  # one more step with CUDA sync debugging on, after the timed ones
    n = a.warmup + a.steps + int(counted) + int(profiled)  # then the profiled step
    # The batches in turn (batch_size=None: no collation); Lightning moves each to the GPU, as in training.
    loader = torch.utils.data.DataLoader([cpu[i % len(cpu)] for i in range(n)], batch_size=None,
                                         pin_memory=device.type == "cuda")
    cfg = TrainConfig(data_file="-", lr_init=1e-5, weight_decay=0.0, pack=a.pack, ddp_grad_dtype=a.ddp_grad_dtype,
                      master_weights=a.master_weights, ddp_bucket_mb=a.ddp_bucket_mb,
                      ddp_nccl_high_priority=a.ddp_nccl_high_priority, ddp_nccl_ctas=a.ddp_nccl_ctas,
                      ddp_gemm_sm_carveout=a.ddp_gemm_sm_carveout, ddp_avg_in_allreduce=a.ddp_avg_in_allreduce,
                      strategy="ddp" if uses_ddp(a) else "auto")
    trainable = [n_ for n_, p in model.named_parameters() if p.requires_grad]
    module = VisualRWKVTrainModule(model, cfg, trainable)
    if a.lightning_sigterm:
        import visualrwkv.train.strategies as strategies

        strategies.install_lagged_sigterm_check = lambda trainer, lag=2: False  # the module calls it at train start

    class Timer(pl.Callback):
        prof = None
        caught = None
        gc_clock = GCClock()  # this call's timed steps only

        phases = PhaseClock(device)

        def timed(self, batch_idx: int) -> bool:
            return a.warmup <= batch_idx < a.warmup + a.steps

        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == a.warmup:
                sync(device)
                self.gc_clock.start()
                self.t0 = time.perf_counter()
            self.batch_idx = batch_idx  # for the backward hooks, which are not given it
            if self.timed(batch_idx):
                self.phases.mark("start")
            if batch_idx == a.warmup + a.steps + int(counted):  # with --profile: one more step, profiled
                from torch.profiler import ProfilerActivity, profile

                sync(device)
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.tp = time.perf_counter()

        def on_before_backward(self, trainer, pl_module, loss):
            if self.timed(self.batch_idx):
                self.phases.mark("backward")

        def on_after_backward(self, trainer, pl_module):
            if self.timed(self.batch_idx):
                self.phases.mark("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            # after the optimizer step (automatic optimization)
            if self.timed(batch_idx):
                self.phases.mark("end")
            if batch_idx == a.warmup + a.steps - 1:
                # Nothing in the timed steps waits for the GPU unless the loop syncs, so the host's time
                # to queue them is close to the step time only when it is CPU-bound (or the queue is full).
                host = (time.perf_counter() - self.t0) / a.steps
                self.gc_clock.stop()
                state = gpu_state(device)  # the GPU is still working through the queued steps
                sync(device)
                self.dt = (time.perf_counter() - self.t0) / a.steps
                if trainer.global_rank == 0:
                    print(f"  host time to queue one step: {host * 1e3:.1f} ms of {self.dt * 1e3:.1f} ms",
                          file=sys.stderr, flush=True)
                    print(f"  Python's cyclic GC in the timed steps: {self.gc_clock.report(a.steps)}", file=sys.stderr,
                          flush=True)
                print(f"  rank {trainer.global_rank}'s GPU near the end of the timed steps: {state}", file=sys.stderr,
                      flush=True)
                print(f"  rank {trainer.global_rank}'s step, mean ms on the {'GPU' if device.type == 'cuda' else 'host'}: "
                      f"{self.phases.report()}", file=sys.stderr, flush=True)
                if counted:
                    # Every host-device synchronisation in one whole iteration of Lightning's loop, from here
                    # to the end of the next step (the loop's own work before the step's hooks included):
                    # each one drains the GPU's queue, which then idles while the host launches again.
                    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                    from gpu_profile import SyncSites

                    self.caught = SyncSites(depth=4, cuda=True)
                    self.caught.__enter__()
            if self.caught is not None and batch_idx == a.warmup + a.steps:
                self.caught.__exit__(None, None, None)
                if trainer.global_rank == 0:
                    print("  " + self.caught.report("one iteration of Lightning's training loop"), file=sys.stderr,
                          flush=True)
                self.caught = None
            if self.prof is not None and batch_idx == a.warmup + a.steps + int(counted):
                sync(device)
                wall = time.perf_counter() - self.tp
                self.prof.__exit__(None, None, None)
                if trainer.global_rank == 0:
                    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                    from gpu_profile import table_from_profile

                    print(table_from_profile(self.prof, wall, label=f"one Lightning step on rank 0 of {a.devices}",
                                             top=a.profile_top), flush=True)

    timer = Timer()
    precision = "32-true" if device.type != "cuda" else a.precision
    multi = uses_ddp(a)
    # With DDP every rank steps through the same n batches (no distributed sampler: the list is a
    # stand-in for a per-rank data stream), so each rank does a full micro-batch per step. The DDP
    # strategy is the one 'visualrwkv train --strategy ddp' builds (gradients in the buckets).
    strategy = make_strategy(cfg) if multi else "auto"
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=a.devices,
                         strategy=strategy, use_distributed_sampler=False, precision=precision,
                         max_steps=n, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return timer.dt


def main(argv: Optional[List[str]] = None) -> int:
    a = parse(argv)
    import logging

    if a.alloc and torch.cuda.is_available():
        torch.cuda.memory._set_allocator_settings(a.alloc)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-row Trainer banners
    if not a.tiny and not torch.cuda.is_available():
        print("bench_train_gpu.py: no CUDA GPU found; nothing to measure here "
              "(use --tiny for a CPU smoke run of the same code)", file=sys.stderr)
        return 0
    if uses_ddp(a) and not a.lightning:
        print("bench_train_gpu.py: --devices > 1 and --ddp 1 need --lightning (DDP through pl.Trainer)", file=sys.stderr)
        return 2
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and not a.tiny:
        torch.cuda.set_device(rank)  # each DDP process builds its model on its own GPU
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() and not a.tiny else "cpu")
    say = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *x, **k: None)
    if a.tiny:
        a.micro_bsz = [min(b, 2) for b in a.micro_bsz][:1]
        a.text_len = [min(t, 32) for t in a.text_len][:1]
        a.steps, a.warmup = min(a.steps, 2), min(a.warmup, 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from visualrwkv.errors import UserError
    from visualrwkv.ops import fla_varlen

    try:  # before the model is built: a bad file fails in a second, not after the build
        pool = length_pool(a.lengths_from) if a.lengths_from else None
    except (OSError, ValueError, UserError) as e:  # bad path, not JSON, not a list of records or ints
        print(f"bench_train_gpu.py: --lengths_from {a.lengths_from}: cannot read lengths ({e})", file=sys.stderr)
        return 2

    fla_varlen.set_enabled(bool(a.fla_sync_free))
    if a.compile and device.type == "cuda":
        # Compiler settings are read when the graphs compile; set here, a bad --inductor key ends the
        # run before the model is built.
        from torch._functorch import config as functorch_config

        functorch_config.activation_memory_budget_runtime_estimator = a.act_estimator
        inductor_settings(a.inductor)
    t0 = time.perf_counter()
    model, vcfg = build_model(a, device)
    model.rwkv.grad_cp = bool(a.grad_cp)
    if a.compile and device.type == "cuda":
        from visualrwkv.train.model import compile_for_training

        compile_for_training(model, 1.0 if a.act_budget is None else a.act_budget, compile_vit=bool(a.compile_vit),
                             fused_norm_gate=bool(a.fused_norm_gate), wkv_custom_op=bool(a.wkv_op),
                             wkv_keep_states=bool(a.wkv_keep),
                             fused_mix=bool(a.fused_mix))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dcfg = TrainConfig(ddp_bucket_mb=a.ddp_bucket_mb, ddp_nccl_ctas=a.ddp_nccl_ctas)  # the derived DDP settings
    buckets = "one bucket after the backward" if dcfg.ddp_one_bucket else f"{dcfg.ddp_bucket_cap_mb:g} MB buckets"
    ddp = (f" (DDP, {buckets}, NCCL stream priority {'high' if a.ddp_nccl_high_priority else 'normal'}"
           f", {dcfg.ddp_max_ctas or 'NCCL-chosen'} CTAs, backward matmuls leave {a.ddp_gemm_sm_carveout} SMs, "
           f"{'AVG in the all-reduce' if a.ddp_avg_in_allreduce else 'DDP divides each gradient'}, "
           f"{'Lightning' if a.lightning_sigterm else 'lagged'} SIGTERM check)") if a.lightning and uses_ddp(a) else ""
    say(f"# {name} x {a.devices if a.lightning else 1}{ddp}; model {model.rwkv.cfg.n_layer} x {model.rwkv.cfg.n_embd}, vocab {model.rwkv.cfg.vocab_size}, "
          f"{n_params / 1e9:.2f}B parameters incl. tower; {model.n_image_tokens} image tokens/sample; "
          f"precision {a.precision if device.type == 'cuda' else 'fp32'}; grad_cp {a.grad_cp}; pack {a.pack}; "
          f"{lengths_desc(a)} lengths; {a.batches} distinct batch(es); compile {a.compile}"
          f"{' (vision tower too)' if a.compile and a.compile_vit else ''}"
          f"{'' if a.act_budget is None else ' (activation budget %g, %s)' % (a.act_budget, a.act_estimator)}; "
          f"{'' if a.fla_sync_free else 'fla state pass with host sync; '}"
          f"{'fused ln_x + gate; ' if a.compile and a.fused_norm_gate else ''}"
          f"{'WKV as custom ops; ' if a.compile and a.wkv_op else ''}"
          f"{'WKV chunk states kept; ' if a.compile and a.wkv_op and a.wkv_keep else ''}"
          f"{'bf16 linear weights + fp32 masters; ' if a.master_weights else ''}"
          f"{'inductor ' + a.inductor + '; ' if a.inductor else ''}"
          f"{'lightning' if a.lightning else 'plain loop'}; built in {time.perf_counter() - t0:.0f}s")
    header = f"{'stage':>5} {'micro_bsz':>9} {'text_len':>8} {'seq_len':>7} {'step_ms':>9} {'samples/s':>10} " \
             f"{'tokens/s':>10} {'peak_GiB':>9}"
    say(header)
    say("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for stage in a.stages:
        params = freeze(model, stage)
        if a.master_weights and device.type == "cuda" and a.precision == "bf16-mixed":
            from visualrwkv.train.optim import bf16_linear_weights_

            bf16_linear_weights_(model)
        for B in a.micro_bsz:
            for T in a.text_len:
                batches = [make_batch(B, T, vcfg.image_size, model.rwkv.cfg.vocab_size, device, gen, a.ragged,
                                      a.text_min, pool) for _ in range(max(1, a.batches))]
                for b in batches:  # as the Lightning module does, from the CPU batch (untimed here)
                    b["splice_numbers"] = model.splice_numbers(b["input_ids"].cpu(), b["lengths"].cpu(), None,
                                                               b["labels"].cpu())
                # longest row (the placeholder replaced by the image tokens); real tokens per step (no
                # padding), averaged over the timed steps' batches
                seq = max(int(b["lengths"].max()) for b in batches) - 1 + model.n_image_tokens
                timed = [batches[i % len(batches)] for i in range(a.warmup, a.warmup + a.steps)]
                n_tok = sum(int(b["lengths"].sum()) + B * (model.n_image_tokens - 1) for b in timed) / len(timed)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    dt = time_lightning(model, batches, a, device) if a.lightning else \
                        time_raw(model, params, batches, a, device)
                except torch.cuda.OutOfMemoryError:
                    say(f"{stage:>5} {B:>9} {T:>8} {seq:>7} {'OOM':>9}")
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
                world = a.devices if a.lightning else 1  # samples/s and tokens/s over all GPUs
                say(f"{stage:>5} {B:>9} {T:>8} {seq:>7} {dt * 1e3:>9.1f} {world * B / dt:>10.2f} "
                    f"{world * n_tok / dt:>10.0f} {peak:>9.2f}", flush=True)
                model.zero_grad(set_to_none=True)
                del batches, timed
                gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
