"""Tokenizer throughput on one CPU core: WorldTokenizer (Rust backend, and the pure-Python
fallback) vs the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, in MB of UTF-8 text per second.

    python benchmarks/bench_tokenizer.py [--mb 4] [--repeat 3]

Two corpora: a deterministic mix of English prompts (the LLaVA sample if present), Chinese, code,
emoji and whitespace runs; and the LLaVA sample's own turns repeated (OCR-token lists, many short
tokens: the slowest realistic case). Every backend's ids are checked against the reference first. The
target for the Rust backend is >= 30 MB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

SAMPLE = "/work/shared/data/llava_sample/dummy.json"


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    english = []
    if os.path.exists(SAMPLE):
        english = [t["value"] for r in json.load(open(SAMPLE)) for t in r["conversations"]]
    english += ["The quick brown fox jumps over the lazy dog. " * 3,
                "User: What is in the image?\n\nAssistant: A cat sitting on a red sofa.\n\n"]
    chinese = ["这是一个测试。我们用中文写一段话，看看分词的速度。", "图片里有什么？请用一个词或短语回答。"]
    code = ["def f(x):\n    return [i * i for i in range(x)]\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n"]
    other = ["😀🎉👍🏽 👨‍👩‍👧‍👦 ", " " * 40, "line\r\nline\r\n", "¿Qué tal? Ça va. Straße. Привет, мир. "]
    pools = [(english, 0.6), (chinese, 0.15), (code, 0.15), (other, 0.1)]
    parts, size = [], 0
    while size < n_bytes:
        pool = rng.choices([p for p, _ in pools], weights=[w for _, w in pools])[0]
        piece = rng.choice(pool)
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "\n".join(parts)


def llava_text(n_bytes: int) -> str:
    texts = [t["value"] for r in json.load(open(SAMPLE)) for t in r["conversations"]]
    one = "\n\n".join(texts)
    return "\n\n".join([one] * max(1, n_bytes // len(one.encode("utf-8"))))


def best_time(fn, text: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=4.0, help="MB of text (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per backend; the best is reported")
    ap.add_argument("--python", action="store_true", help="also time the pure-Python fallback (slow)")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):  # one core, whatever the backend would like to use
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from visualrwkv.tokenizer import WorldTokenizer

    ref = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    tok = WorldTokenizer()
    rows = [("rwkv TRIE_TOKENIZER (reference)", ref.encode)]
    rows.append((f"WorldTokenizer.encode ({tok.backend})", tok.encode))
    if args.python:
        rows.append(("WorldTokenizer.encode_python", tok.encode_python))
    corpora = [("mixed", mixed_text(int(args.mb * 1e6)))]
    if os.path.exists(SAMPLE):
        corpora.append(("llava-sample", llava_text(int(args.mb * 1e6))))

    print(f"one core; best of {args.repeat} runs")
    print(f"{'corpus':<13} {'MB':>5} {'backend':<36} {'seconds':>8} {'MB/s':>8} {'vs ref':>7}  ids")
    for corpus, text in corpora:
        mb = len(text.encode("utf-8")) / 1e6
        expected = ref.encode(text)
        ref_speed = None
        for name, fn in rows:
            same = "same" if fn(text) == expected else "DIFFERENT"
            sec = best_time(fn, text, args.repeat)
            speed = mb / sec
            ref_speed = ref_speed or speed
            print(f"{corpus:<13} {mb:>5.2f} {name:<36} {sec:>8.3f} {speed:>8.1f} {speed / ref_speed:>6.1f}x  {same}")


if __name__ == "__main__":
    main()
