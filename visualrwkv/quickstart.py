"""``visualrwkv quickstart``: the whole system end to end on a CPU, with nothing downloaded.

    visualrwkv quickstart                       # the README's first command (2 CPU cores)
    visualrwkv quickstart --fast                # a 1-minute smoke run of the same pipeline (CI)
    visualrwkv quickstart --out runs/qs --seed 1 --stage2_steps 3000

Steps (each with the same code a real run uses):
  1. data    -- ``visualrwkv data synth``: 64 px images with 1-3 shapes in the cells of a 2 x 2 grid,
                caption records (stage 1), question/answer records (stage 2) and held-out questions
                (colour, shape, count, position, size, yes/no), all from a seed;
  2. presets -- a tiny random CLIP tower (a transformers CLIPVisionModel with 32 px patches, one per
                grid cell; its processor maps the white background to zero) and a tiny RWKV-6
                (4 x 128) with the real World tokenizer. The tower stays frozen: a linear probe on its
                random cell tokens already separates colour, shape and size;
  3. stage 1 -- ``visualrwkv train`` on the captions. The preset's RWKV starts from random weights,
                and a random RWKV-6 is an identity map at initialisation (its output projections start
                at zero), so a projector-only stage 1 could learn nothing: here stage 1 trains the
                projector and the language model (``--freeze_rwkv 0``). With a pretrained RWKV, stage 1
                is ``--freeze_rwkv n_layer`` as usual;
  4. stage 2 -- ``visualrwkv train --model_path stage1/rwkv-0.pth`` on the question/answer data;
  5. eval    -- ``visualrwkv eval --benchmark custom`` (batched greedy decoding) on the held-out
                questions, exact match per question type next to the chance level;
  6. chat    -- prints the exact ``visualrwkv chat`` command for the trained checkpoint.
The image goes after the question (``--image_position last``): the recurrent model reads the
question first and then scans the image with it in its state.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

from visualrwkv.errors import UserError

EXAMPLE = "visualrwkv quickstart --out runs/quickstart"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visualrwkv quickstart",
        description="Train a tiny VisualRWKV on built-in synthetic data (stage 1 + stage 2), evaluate it on "
                    "held-out questions and print a chat command. CPU only, no downloads.",
        epilog=f"example: {EXAMPLE}\n         visualrwkv quickstart --fast   # a short smoke run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a very short run of the same pipeline (smoke test)")
    p.add_argument("--n_train", type=int, default=None, help="training images (default 12000; --fast 64)")
    p.add_argument("--n_test", type=int, default=None, help="held-out images, 6 questions each (default 100; --fast 4)")
    p.add_argument("--stage1_steps", type=int, default=None, help="stage-1 micro-steps (default 600; --fast 4)")
    p.add_argument("--stage2_steps", type=int, default=None, help="stage-2 micro-steps (default 1500; --fast 6)")
    p.add_argument("--micro_bsz", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="initial learning rate of both stages (cosine to lr/10)")
    p.add_argument("--image_position", default="last", choices=["first", "middle", "last"],
                   help="where the image goes in the prompt (default last: the question is read first)")
    p.add_argument("--max_turns", type=int, default=1, help="question turns per stage-2 record (default 1)")
    p.add_argument("--train_vit", type=int, default=0, choices=[0, 1],
                   help="also train the tiny tower (default 0: its random features already separate every attribute)")
    p.add_argument("--n_layer", type=int, default=None, help="RWKV layers (default: the tiny preset's)")
    p.add_argument("--n_embd", type=int, default=None, help="RWKV width (default: the tiny preset's)")
    p.add_argument("--grid_size", type=int, default=-1,
                   help="image tokens: -1 -> every patch (2 x 2 cells of 32 px) + CLS = 5 tokens")
    p.add_argument("--patch_size", type=int, default=32,
                   help="tower patch size in pixels of the 64 px images (32: one patch per grid cell)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--keep", action="store_true", help="keep an existing --out folder (resume) instead of replacing it")
    return p


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _train(argv: List[str]) -> None:
    from visualrwkv.train.cli import main as train_main

    rc = train_main(argv)
    if rc not in (0, None):
        raise UserError(f"training failed (exit code {rc})")


def _norm(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def _read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_answers(answers_path: str, test_path: str) -> Dict[str, Dict[str, float]]:
    """Exact match (case and trailing period ignored) per question type, from eval's answer file:
    type -> {"n", "accuracy" (a fraction)}, plus "all"."""
    from visualrwkv.eval.metrics.common import group_metrics, load_answers

    gold = {str(q["question_id"]): q for q in _read_jsonl(test_path)}
    pairs = [(gold[k]["type"], _norm(a["text"]) == _norm(gold[k]["answer"]))
             for a in load_answers(answers_path) if (k := str(a["question_id"])) in gold]
    out = {t: {"n": m["n"], "accuracy": m["accuracy"] / 100} for t, m in group_metrics(pairs).items()}
    out["all"] = {"n": len(pairs), "accuracy": sum(ok for _, ok in pairs) / max(1, len(pairs))}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    from visualrwkv.data.synth import chance_levels, generate
    from visualrwkv.presets import TINY_RWKV, make_tiny_vision_tower

    if a.threads:
        torch.set_num_threads(a.threads)
    n_train = a.n_train or (64 if a.fast else 12000)
    n_test = a.n_test or (4 if a.fast else 100)
    s1 = a.stage1_steps if a.stage1_steps is not None else (4 if a.fast else 600)
    s2 = a.stage2_steps if a.stage2_steps is not None else (6 if a.fast else 1500)
    bsz = min(a.micro_bsz, 4) if a.fast else a.micro_bsz
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not a.keep:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    _banner(f"1/5 synthetic data: {n_train} training images, {n_test} held-out images (seed {a.seed})")
    paths = generate(os.path.join(out, "data"), seed=a.seed, n_train_images=n_train, n_test_images=n_test,
                     image_size=64, max_turns=a.max_turns)
    # The tower's processor maps the white background to zero (mean 1, std 0.5 after rescaling to
    # [0, 1]), so an empty cell's patch embedding is zero and every token's features come from the
    # shape drawn in it. With this, a linear probe on the random, untrained tower's cell tokens
    # separates colour, shape and size of held-out objects (~100%), so the tower can stay frozen.
    tower = str(make_tiny_vision_tower(os.path.join(out, "tower"), image_size=64, patch_size=a.patch_size, hidden_size=128,
                                       layers=2, heads=4, seed=a.seed, image_mean=(1.0, 1.0, 1.0),
                                       image_std=(0.5, 0.5, 0.5)))
    common = ["--vision_tower_name", tower, "--image_folder", paths["image_folder"], "--ctx_len", "256",
              "--grid_size", str(a.grid_size), "--image_position", a.image_position, "--train_vit", str(a.train_vit),
              "--micro_bsz", str(bsz), "--accelerator", "cpu", "--devices", "1", "--precision", "fp32",
              "--epoch_count", "1", "--epoch_save", "0", "--warmup_steps", "20" if not a.fast else "1",
              "--beta1", "0.9", "--beta2", "0.99", "--adam_eps", "1e-8", "--random_seed", str(a.seed),
              "--freeze_rwkv", "0", "--wandb", "", "--log_every_n_steps", "10"]

    _banner(f"2/5 stage 1: captions, {s1} steps (projector and language model learn: the RWKV starts from random weights)")
    _train(["--data_file", paths["stage1"], "--proj_dir", os.path.join(out, "stage1"),
            "--n_layer", str(a.n_layer or TINY_RWKV["n_layer"]), "--n_embd", str(a.n_embd or TINY_RWKV["n_embd"]),
            "--vocab_size", str(TINY_RWKV["vocab_size"]), "--epoch_steps", str(s1),
            "--lr_init", str(a.lr), "--lr_final", str(a.lr / 10)] + common)
    stage1 = os.path.join(out, "stage1", "rwkv-0.pth")

    _banner(f"3/5 stage 2: questions and answers, {s2} steps, from {stage1}")
    _train(["--data_file", paths["stage2"], "--proj_dir", os.path.join(out, "stage2"), "--model_path", stage1,
            "--epoch_steps", str(s2), "--lr_init", str(a.lr), "--lr_final", str(a.lr / 10)] + common)
    ckpt = os.path.join(out, "visualrwkv-quickstart.pth")
    shutil.copyfile(os.path.join(out, "stage2", "rwkv-0.pth"), ckpt)

    _banner("4/5 evaluation on the held-out questions (visualrwkv eval, batched greedy decoding)")
    from visualrwkv.eval.run import main as eval_main

    answers = os.path.join(out, "answers.jsonl")
    rc = eval_main(["--model_path", ckpt, "--vision_tower_name", tower, "--benchmark", "custom",
                    "--question_file", paths["test"], "--image_folder", paths["image_folder"],
                    "--output_file", answers, "--grid_size", str(a.grid_size), "--image_position", a.image_position,
                    "--device", "cpu", "--batch_size", "32", "--max_new_tokens", "8", "--overwrite"])
    if rc not in (0, None):
        raise UserError(f"evaluation failed (exit code {rc})")
    scores = score_answers(answers, paths["test"])
    chance = chance_levels(paths["test"])
    print(f"\n{'type':<10} {'questions':>9} {'accuracy':>9} {'chance':>7}")
    for t, s in scores.items():
        c = chance.get(t, {}).get("majority")
        print(f"{t:<10} {s['n']:>9} {100 * s['accuracy']:>8.1f}% {'' if c is None else f'{100 * c:>6.1f}%'}")
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump({"accuracy": scores, "chance": chance}, f, indent=1)

    gold = _read_jsonl(paths["test"])
    got = {str(r["question_id"]): r["text"] for r in _read_jsonl(answers)}
    print("\nsample questions:")
    for q in gold[:: max(1, len(gold) // 6)][:6]:
        question = q["text"].split("\n")[0]
        print(f"  [{q['image']}] {question}  ->  {got.get(str(q['question_id']), '?')!r} (truth: {q['answer']})")

    minutes = (time.time() - t_start) / 60
    image = os.path.join(paths["image_folder"], gold[0]["image"])
    question = gold[0]["text"].split("\n")[0]
    _banner(f"5/5 done in {minutes:.1f} min; checkpoint {ckpt}")
    cmd = (f"visualrwkv chat --model_path {ckpt} --vision_tower_name {tower} --grid_size {a.grid_size} "
           f"--image_position {a.image_position} --image {image} --prompt \"{question}\" --greedy")
    with open(os.path.join(out, "chat_command.txt"), "w") as f:
        f.write(cmd + "\n")
    print("talk to it:\n  " + cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
