"""Benchmark evaluation speed: questions/s of ``visualrwkv eval``'s batched greedy decoding
(``visualrwkv.eval.run.answer_jobs``: images read by worker threads, the tower run in batches, rows
decoded together and refilled as they finish) against batch size 1.

    python benchmarks/bench_eval.py                                   # CPU, tiny random model
    python benchmarks/bench_eval.py --device cuda --shape 1.6b        # 1.6B-shaped model, CLIP-L/336 tower, bf16

The model is random: an RWKV-6 built with ``RWKV6Config`` + ``init_weights`` (24 layers x 2048 for
1.6b) and a random CLIP tower saved to a temporary folder with its ``CLIPImageProcessor``
(ViT-L/14 at 336 px for 1.6b: 577 image tokens). The questions are synthetic VQA-style questions
(VQAv2 prompt suffix) about random images written as JPEG files, several questions per image as in
VQAv2; they go through the same path as the eval command: question file -> ``load_questions`` ->
image loading and preprocessing -> prompt building -> engine. Random weights never decide to stop,
so tokens that could end an answer are banned and every answer is exactly ``--max_new_tokens``
tokens long: every batch size does the same work.

Printed: one table row per batch size with the questions, wall time, questions/s, generated
tokens/s and the speedup over batch size 1. Each batch size first answers a warm-up set (kernel
selection, CUDA graph capture) that is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    # name: (n_layer, n_embd, tower: (hidden, intermediate, layers, heads, image_size, patch))
    "tiny": (4, 128, (64, 128, 2, 2, 64, 16)),
    "1.6b": (24, 2048, (1024, 4096, 24, 16, 336, 14)),  # VisualRWKV-6 1.6B + CLIP ViT-L/14-336
}

OBJECTS = ["dog", "cat", "car", "bus", "tree", "person", "table", "cup", "horse", "umbrella", "clock", "pizza"]
TEMPLATES = ["What color is the {o}?", "How many {o}s are there?", "Is there a {o} in the picture?",
             "Where is the {o}?", "What is the {o} doing?", "What is next to the {o}?"]


def save_random_tower(folder: str, shape: str, seed: int = 0) -> str:
    """A random CLIP vision tower of the shape, saved with its image processor (as a hub tower is)."""
    import transformers

    hidden, inter, layers, heads, isz, patch = SHAPES[shape][2]
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, image_size=isz, patch_size=patch)
    transformers.CLIPVisionModel(cfg).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": isz},
                                    crop_size={"height": isz, "width": isz}).save_pretrained(folder)
    return folder


def build_model(shape: str, tower: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random VisualRWKV: RWKV-6 with its published initialisation, the saved tower, a random projector."""
    from visualrwkv.layers.rwkv6 import RWKV6Config
    from visualrwkv.models import vision
    from visualrwkv.models.rwkv6 import RWKV6
    from visualrwkv.models.visualrwkv import VisualRWKV

    n_layer, n_embd, _ = SHAPES[shape]
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs (a 1.6B fp32 init on the CPU is slow)
        # init_weights's own generator lives on the CPU; on a GPU the global seed above fixes the weights.
        rwkv = RWKV6(RWKV6Config(n_layer=n_layer, n_embd=n_embd)).init_weights(seed if device.type == "cpu" else None)
    vit = vision.load_vision_model(tower)
    model = VisualRWKV(rwkv, vit, vit.config.hidden_size, grid_size=-1, num_patches=vision.num_patches(vit.config))
    with torch.no_grad():
        model.proj.weight.normal_(0, vit.config.hidden_size ** -0.5)
    return model.to(device=device, dtype=dtype).eval()


def write_questions(folder: str, n_questions: int, n_images: int, image_size: int, seed: int = 0) -> str:
    """Random JPEG images and a VQA-style question file about them (question i is about image
    i mod n_images, so each image gets several questions, spread over the file)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    side = max(image_size, 64) * 3 // 2  # larger than the tower input: resizing and cropping are part of the work
    for k in range(n_images):
        pixels = nrng.integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, "images", f"{k:06d}.jpg"), quality=90)
    path = os.path.join(folder, "questions.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_questions):
            text = rng.choice(TEMPLATES).format(o=rng.choice(OBJECTS))
            f.write(json.dumps({"question_id": i, "image": f"{i % n_images:06d}.jpg", "text": text}) + "\n")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="tiny (CPU default) or 1.6b (GPU default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch_sizes", default=None, help="comma-separated (default 1,32; 1,32,64 on GPU)")
    p.add_argument("--questions", type=int, default=None,
                   help="timed questions per batch size (default 48 on CPU, 512 on GPU)")
    p.add_argument("--questions_bs1", type=int, default=None,
                   help="timed questions at batch size 1, which is slow (default 16 on CPU, 96 on GPU)")
    p.add_argument("--questions_per_image", type=int, default=4, help="questions sharing an image (default 4)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="answer length in tokens (default 16)")
    p.add_argument("--image_position", default="middle", choices=["first", "middle", "last"])
    p.add_argument("--num_workers", type=int, default=None, help="image loading threads (default min(4, cores))")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    a = p.parse_args(argv)

    from visualrwkv.errors import UserError
    from visualrwkv.eval.questions import load_questions
    from visualrwkv.eval.run import Job, answer_jobs, group_by_image
    from visualrwkv.generation import Pipeline, SamplingParams, resolve_device, resolve_dtype
    from visualrwkv.models.vision import load_image_processor

    try:
        device = resolve_device(a.device)
        dtype = resolve_dtype(a.dtype, device)
    except UserError as e:
        print(f"bench_eval: {e}", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    try:
        batch_sizes = [int(x) for x in (a.batch_sizes or ("1,32,64" if gpu else "1,32")).split(",") if x.strip()]
    except ValueError:
        print(f"bench_eval: bad --batch_sizes {a.batch_sizes!r}", file=sys.stderr)
        return 2
    if not batch_sizes or min(batch_sizes) < 1 or a.max_new_tokens < 1 or a.questions_per_image < 1:
        print("bench_eval: batch sizes, --max_new_tokens and --questions_per_image must be >= 1", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = a.shape or ("1.6b" if gpu else "tiny")
    n_q = a.questions or (512 if gpu else 48)
    n_q1 = min(n_q, a.questions_bs1 or (96 if gpu else 16))
    workers = a.num_workers if a.num_workers is not None else min(4, os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tower = save_random_tower(os.path.join(tmp, "tower"), shape)
        model = build_model(shape, tower, device, dtype)
        processor = load_image_processor(tower)
        isz = model.vit.config.image_size
        # Warm-up questions first, then the timed ones (about other images, so nothing is cached).
        n_warm = max(batch_sizes)
        total = n_warm + n_q
        qfile = write_questions(tmp, total, max(1, -(-total // a.questions_per_image)), isz)
        questions = load_questions(qfile, "vqav2")
        warm, timed = questions[:n_warm], questions[n_warm:]
        image_folder = os.path.join(tmp, "images")

        from visualrwkv.tokenizer import get_tokenizer

        tok = get_tokenizer()
        banned = [0] + [i for i in range(1, model.rwkv.cfg.vocab_size) if b"\n" in tok.token_bytes(i)]
        params = SamplingParams.greedy(a.max_new_tokens, banned_tokens=banned)

        n_params = sum(p.numel() for p in model.rwkv.parameters())
        dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
        print(f"VisualRWKV eval benchmark: {dev_name}, {str(dtype).replace('torch.', '')}, shape {shape} "
              f"(RWKV {n_params / 1e6:.0f}M params, {model.n_image_tokens} image tokens), image position "
              f"{a.image_position}, {a.questions_per_image} questions per image, {a.max_new_tokens} tokens "
              f"per answer, {workers} image threads\n")

        def answer(pipe, qs, batch_size) -> float:
            jobs = group_by_image([Job(q, q.prompt, q.image, params, f"question {q.id}") for q in qs])
            sync(device)
            start = time.perf_counter()
            n = sum(1 for _ in answer_jobs(pipe, jobs, batch_size, image_folder, workers))
            sync(device)
            assert n == len(qs)
            return time.perf_counter() - start

        rows = []
        base_qps = None
        for bs in batch_sizes:
            pipe = Pipeline(model, processor, tok, image_position=a.image_position,
                            prefix_cache_size=8 if a.image_position == "first" else 0, max_batch_size=bs)
            count = n_q1 if bs == 1 else n_q
            try:
                answer(pipe, warm[: max(bs, 2)], bs)  # warm-up: kernels, allocator, CUDA graphs
                seconds = answer(pipe, timed[:count], bs)
            except torch.OutOfMemoryError:
                rows.append((bs, count, None, None, None, None))
                continue
            finally:
                del pipe
                if gpu:
                    torch.cuda.empty_cache()
            qps = count / seconds
            if bs == 1:
                base_qps = qps
            rows.append((bs, count, seconds, qps, qps * a.max_new_tokens, None if base_qps is None else qps / base_qps))

    print("| batch size | questions | seconds | questions/s | generated tokens/s | speedup vs batch 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bs, count, seconds, qps, tps, speedup in rows:
        if seconds is None:
            print(f"| {bs} | {count} | out of memory | | | |")
            continue
        sp = f"{speedup:.1f}x" if speedup is not None else "n/a"
        print(f"| {bs} | {count} | {seconds:.2f} | {qps:.2f} | {tps:.0f} | {sp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
