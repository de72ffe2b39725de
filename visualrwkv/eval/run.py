"""``visualrwkv eval``: answer a benchmark's questions with batched greedy decoding (SPEC §6, §8).

The questions come from ``visualrwkv.eval.questions.load_questions`` (LLaVA's ``.jsonl`` /
``.json`` layouts or an MMBench ``.tsv`` with base64 images), with the benchmark's prompt suffix
already applied; MMBench / MMBench-CN are expanded into their circular variants. Each question
becomes the human turn ``"<image>\\n" + prompt`` formatted with the model's ``--image_position``
(``build_inference_ids``, the same format as training), and is answered greedily by the generation
engine. Many questions decode together in one continuously refilled batch: a finished row leaves
at once and the next question takes its slot. Images are read and preprocessed by background
threads, run through the vision tower in batches, and questions about the same image are asked
one after the other so that the tower runs once per image (and, with ``--image_position first``,
the prompt prefix up to the image is computed once too).

The answer file is JSONL, one line per question, written and flushed as soon as the answer is
complete::

    {"question_id": ..., "prompt": ..., "text": ..., "model_id": ..., "mean_prob": ...,
     "category": ... (when the question has one), "image": ... (its file, when it has one),
     "round_id": ... (only when the question file gives one)}

``mean_prob`` is the mean probability the model gave its generated tokens. MMBench rotations are
answered under the id ``index + k * 1_000_000`` (the numbering of the legacy MMBench files), which
``visualrwkv score`` understands.

Runs are resumable: questions whose answer is already in ``--output_file`` are skipped, and a
half-written last line (a crash while writing) is dropped and answered again. Several GPUs split
the questions with ``--num_chunks`` / ``--chunk_idx`` (contiguous, deterministic chunks), and
``--merge`` joins the chunk files (``cat`` works too: the chunks hold disjoint questions).

``answer_jobs`` is the batching core; the lmms-eval plugin (``visualrwkv.eval.lmms_plugin``) and
``benchmarks/bench_eval.py`` drive it too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.questions import (BENCHMARKS, IDS_MAY_REPEAT, Question, circular_questions, id_key,
                                      load_questions)

EXAMPLES = """\
examples:
  # TextVQA on one GPU (LLaVA's eval layout under ./playground/data/eval)
  visualrwkv eval --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth \\
      --vision_tower_name openai/clip-vit-large-patch14-336 --benchmark textvqa \\
      --question_file ./playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \\
      --image_folder ./playground/data/eval/textvqa/train_images \\
      --output_file ./playground/data/eval/textvqa/answers/visualrwkv-v060-1b6.jsonl
  visualrwkv score --benchmark textvqa \\
      --answers ./playground/data/eval/textvqa/answers/visualrwkv-v060-1b6.jsonl \\
      --annotations ./playground/data/eval/textvqa/TextVQA_0.5.1_val.json \\
      --question_file ./playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl

  # MMBench (tsv with base64 images; each question is asked in all its option rotations)
  visualrwkv eval --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth \\
      --vision_tower_name openai/clip-vit-large-patch14-336 --benchmark mmbench \\
      --question_file ./playground/data/eval/mmbench/mmbench_dev_20230712.tsv \\
      --output_file ./playground/data/eval/mmbench/answers/visualrwkv-v060-1b6.jsonl

  # GQA on 8 GPUs: one chunk per GPU, then merge the chunk files
  for K in 0 1 2 3 4 5 6 7; do
    CUDA_VISIBLE_DEVICES=$K visualrwkv eval --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth \\
        --vision_tower_name openai/clip-vit-large-patch14-336 --benchmark gqa \\
        --question_file ./playground/data/eval/gqa/llava_gqa_testdev_balanced.jsonl \\
        --image_folder ./playground/data/eval/gqa/data/images \\
        --output_file ./playground/data/eval/gqa/answers/chunks/8_$K.jsonl --num_chunks 8 --chunk_idx $K &
  done; wait
  visualrwkv eval --merge ./playground/data/eval/gqa/answers/chunks/8_*.jsonl \\
      --output_file ./playground/data/eval/gqa/answers/visualrwkv-v060-1b6.jsonl
  # (or: cat ./playground/data/eval/gqa/answers/chunks/8_*.jsonl > merged.jsonl)

  # a quick look at the first 20 questions on the CPU
  visualrwkv eval --model_path M.pth --vision_tower_name openai/clip-vit-large-patch14-336 --benchmark pope \\
      --question_file llava_pope_test.jsonl --image_folder val2014 --output_file pope_try.jsonl \\
      --device cpu --limit 20 --batch_size 4

An interrupted run is continued by running the same command again: answered questions are skipped.
"""

MMBENCH = ("mmbench", "mmbench_cn")
# Refill the decoding batch once this share of its slots is free (or it is empty): prompts are
# then prefilled (and images encoded) several at a time instead of one per decoding step.
REFILL_FRACTION = 4


# ==============================================================================================
# The batching core: jobs in, (job, GenerationResult) out as each answer completes
# ==============================================================================================

@dataclass
class Job:
    """One prompt to answer.

    tag    -- anything; returned with the result (eval keeps the Question here).
    text   -- the user turn, without ``<image>`` (the prompt builder places the image).
    image  -- None (text only), a path (relative to ``image_folder``), a PIL image, raw bytes, or a
              zero-argument callable returning one of those (called when the job is about to run,
              so that large data sets are not held in memory).
    params -- sampling for this job (``SamplingParams``).
    name   -- how error messages name the job (e.g. ``question 42``).
    """

    tag: Any
    text: str
    image: Any = None
    params: Any = None
    name: str = ""


def _image_identity(image: Any) -> Any:
    """Something equal for jobs that surely share an image (same path, same object)."""
    if image is None:
        return None
    return ("path", image) if isinstance(image, str) else ("object", id(image))


def group_by_image(jobs: Sequence[Job]) -> List[Job]:
    """A stable reordering that puts jobs about the same image next to each other (in the order of
    each image's first appearance), so its tower output and prefix state are reused."""
    groups: "OrderedDict[Any, List[Job]]" = OrderedDict()
    for i, job in enumerate(jobs):
        ident = _image_identity(job.image)
        groups.setdefault(ident if ident is not None else ("text", i), []).append(job)
    return [job for group in groups.values() for job in group]


class _ImageLoader:
    """Reads and preprocesses job images ahead of time on a few threads.

    ``get(i)`` returns ``(pixel_values (1, 3, H, W), key)`` or None for a text-only job; the key is a
    hash of the pixels the model sees, so identical images share tower output and prefix states."""

    def __init__(self, pipe, jobs: Sequence[Job], image_folder: Optional[str], num_workers: int, ahead: int):
        self.pipe = pipe
        self.jobs = jobs
        self.image_folder = image_folder
        self.ahead = max(1, ahead)
        self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix="eval-images") if num_workers > 0 else None
        self.futures: Dict[int, Future] = {}
        self.submitted = 0  # jobs [0, submitted) have been handed to the pool

    def _load(self, job: Job):
        from visualrwkv.generation.pipeline import load_image

        image = job.image() if callable(job.image) else job.image
        if image is None:
            return None
        try:
            if isinstance(image, (str, os.PathLike)):
                path = os.fspath(image)
                if self.image_folder is not None and not os.path.isabs(path):
                    path = os.path.join(self.image_folder, path)
                image = load_image(path)
            px = self.pipe.pixel_values(image)
        except UserError as e:
            raise UserError(f"{job.name}: {e}" if job.name else str(e)) from None
        key = hashlib.sha1(px.numpy().tobytes() + str(tuple(px.shape)).encode()).hexdigest()
        return px, key

    def get(self, i: int):
        if self.pool is None:
            return self._load(self.jobs[i])
        while self.submitted < min(len(self.jobs), i + self.ahead):
            self.futures[self.submitted] = self.pool.submit(self._load, self.jobs[self.submitted])
            self.submitted += 1
        return self.futures.pop(i).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.futures.clear()


class _EmbeddingCache:
    """Projected image tokens of the last few images, keyed by pixel hash; new images of a refill
    go through the vision tower together."""

    def __init__(self, engine, size: int):
        self.engine = engine
        self.size = max(1, size)
        self.entries: "OrderedDict[str, Any]" = OrderedDict()
        self.tower_images = 0  # images that went through the tower (for tests and statistics)

    def embed(self, loaded: Sequence[Optional[Tuple[Any, str]]]) -> List[Optional[Tuple[Any, str]]]:
        import torch

        new: "OrderedDict[str, Any]" = OrderedDict()
        for item in loaded:
            if item is not None and item[1] not in self.entries and item[1] not in new:
                new[item[1]] = item[0]
        if new:
            w = self.engine.model.proj.weight
            px = torch.cat(list(new.values())).to(w.device, w.dtype)
            with torch.no_grad():
                embs = self.engine.encode_images(px)
            self.tower_images += len(new)
            for k, key in enumerate(new):
                self.entries[key] = embs[k]
        out: List[Optional[Tuple[Any, str]]] = []
        for item in loaded:
            if item is None:
                out.append(None)
            else:
                self.entries.move_to_end(item[1])
                out.append((self.entries[item[1]], item[1]))
        # Trim only after every image of this refill has been looked up.
        while len(self.entries) > max(self.size, len(new)):
            self.entries.popitem(last=False)
        return out


def answer_jobs(pipe, jobs: Sequence[Job], batch_size: int = 32, image_folder: Optional[str] = None,
                num_workers: int = 2, stats: Optional[Dict[str, int]] = None) -> Iterator[Tuple[Job, Any]]:
    """Answer ``jobs`` with ``pipe`` (a ``Pipeline``); yields ``(job, GenerationResult)`` as each
    answer completes (not in job order). At most ``batch_size`` jobs decode together.

    Jobs are asked in the given order (use ``group_by_image`` first). ``stats`` (a dict), when
    given, receives ``tower_images`` (images encoded) and ``prompt_tokens`` / ``cached_tokens``."""
    from visualrwkv.generation.engine import GenerationRequest
    from visualrwkv.generation.sampling import SamplingParams

    engine = pipe.engine
    batch_size = max(1, int(batch_size))
    refill_at = max(1, batch_size // REFILL_FRACTION)
    loader = _ImageLoader(pipe, jobs, image_folder, num_workers, ahead=2 * batch_size)
    cache = _EmbeddingCache(engine, size=batch_size)
    batch = engine.new_batch()
    stats = stats if stats is not None else {}
    stats.setdefault("prompt_tokens", 0)
    stats.setdefault("cached_tokens", 0)

    def finished(pairs):
        for req, res in pairs:
            stats["prompt_tokens"] += res.prompt_tokens
            stats["cached_tokens"] += res.cached_tokens
            yield req.tag, res

    nxt = 0  # index of the next job to start
    try:
        while nxt < len(jobs) or len(batch):
            free = batch_size - len(batch)
            if nxt < len(jobs) and (len(batch) == 0 or free >= refill_at):
                take = list(range(nxt, min(len(jobs), nxt + free)))
                nxt += len(take)
                images = cache.embed([loader.get(i) for i in take])
                requests = []
                for i, image in zip(take, images):
                    job = jobs[i]
                    params = job.params or SamplingParams.greedy(128)
                    ids = pipe.prompt_ids([("human", job.text)], has_image=image is not None)
                    emb, key = image if image is not None else (None, None)
                    requests.append(GenerationRequest(ids, emb, key, params, tag=job))
                yield from finished(batch.add(requests))
            if len(batch):
                yield from finished(batch.step())
    finally:
        loader.close()
        stats["tower_images"] = stats.get("tower_images", 0) + cache.tower_images


# ==============================================================================================
# Answer files: keys, reading (with crash recovery), writing, merging
# ==============================================================================================

def answer_key(question_id: Any, prompt: str, benchmark: str, round_id: int = 0) -> str:
    """What makes an answer the answer to one question: its id (and round), plus its prompt for the
    benchmarks whose question files repeat ids (TextVQA, MME)."""
    key = id_key(question_id) + "#" + str(int(round_id or 0))
    if benchmark in IDS_MAY_REPEAT:
        key += "#" + " ".join(str(prompt).split())
    return key


def question_key(q: Question, benchmark: str) -> str:
    return answer_key(q.id, q.prompt, benchmark, _written_round(q))


def record_key(rec: Dict[str, Any], benchmark: str) -> str:
    return answer_key(rec["question_id"], rec.get("prompt", ""), benchmark, rec.get("round_id", 0) or 0)


def _written_round(q: Question) -> int:
    """The round_id an answer carries: only when the question file gave one (MMBench rotations made
    here, and the rows of legacy MMBench files, carry the rotation in their id instead)."""
    return int(q.round_id) if "round_id" in q.meta else 0


def answer_record(q: Question, result, model_id: str) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"question_id": q.id, "prompt": q.prompt, "text": result.text, "model_id": model_id,
                           "mean_prob": round(float(result.mean_prob), 6)}
    if q.category is not None:
        rec["category"] = q.category
    if isinstance(q.image, str):
        rec["image"] = q.image
    if "round_id" in q.meta:
        rec["round_id"] = _written_round(q)
    return rec


def read_answer_file(path: str, repair: bool = False) -> List[Dict[str, Any]]:
    """The answers in a JSONL answer file.

    A last line without its newline, or that is not valid JSON, is what a crash while writing
    leaves: it is ignored, and with ``repair`` cut off the file (the question is answered again).
    A bad line anywhere else is a ``UserError`` naming the line."""
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; --output_file must be a file")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # lines[-1] is what follows the last newline: b"" for a complete file, else a partial line.
    complete, tail = lines[:-1], lines[-1]
    records: List[Dict[str, Any]] = []
    good_bytes = 0  # length of the prefix of the file made of good lines
    for lineno, raw in enumerate(complete, 1):
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            rec = _parse_record(raw)
            if rec is None:
                if lineno == len(complete) and not tail.strip():
                    break  # the last line is damaged: treat it as unwritten
                raise UserError(f"{path}:{lineno}: not an answer record ({text[:80]!r}); fix or remove that line")
            records.append(rec)
        good_bytes += len(raw) + 1
    if good_bytes == len(data) - len(tail) and tail.strip():
        # A last line without its newline: a complete record (a file written by hand or another
        # tool) is kept, a cut one is dropped.
        rec = _parse_record(tail)
        if rec is not None:
            records.append(rec)
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
            return records
    if repair and good_bytes < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def _parse_record(raw: bytes) -> Optional[Dict[str, Any]]:
    """An answer record from one line, or None when the line is not one."""
    try:
        rec = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or "question_id" not in rec or not isinstance(rec.get("text"), str):
        return None
    return rec


def _json_line(rec: Dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def merge_answer_files(inputs: Sequence[str], output: str, benchmark: str = "custom",
                       questions: Optional[Sequence[Question]] = None) -> Tuple[int, int, int]:
    """Join chunk answer files into ``output``. Duplicate answers (same key) keep the first; a
    half-written last line of a chunk is skipped. With ``questions`` the answers follow the
    question order. Returns (answers written, duplicates dropped, questions without an answer)."""
    if not inputs:
        raise UserError("--merge needs the chunk answer files to join")
    out_abs = os.path.abspath(output)
    seen: Dict[str, Dict[str, Any]] = {}
    dropped = 0
    for path in inputs:
        if not os.path.isfile(path):
            raise UserError(f"answer file {path!r} does not exist")
        if os.path.abspath(path) == out_abs:
            raise UserError(f"--output_file {output} is also one of the files to merge; choose another name")
        for rec in read_answer_file(path):
            key = record_key(rec, benchmark)
            if key in seen:
                dropped += 1
            else:
                seen[key] = rec
    records = list(seen.values())
    missing = 0
    if questions is not None:
        order = {question_key(q, benchmark): i for i, q in enumerate(questions)}
        missing = sum(1 for k in order if k not in seen)
        records.sort(key=lambda r: order.get(record_key(r, benchmark), len(order)))
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    tmp = out_abs + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(_json_line(rec))
    os.replace(tmp, out_abs)
    return len(records), dropped, missing


# ==============================================================================================
# Question selection
# ==============================================================================================

def get_chunk(items: Sequence[Any], num_chunks: int, chunk_idx: int) -> List[Any]:
    """Chunk ``chunk_idx`` of ``num_chunks`` contiguous, near-equal chunks (sizes differ by at most
    one; every item is in exactly one chunk)."""
    n = len(items)
    return list(items[chunk_idx * n // num_chunks:(chunk_idx + 1) * n // num_chunks])


def select_questions(question_file: str, benchmark: str, num_chunks: int = 1, chunk_idx: int = 0,
                     limit: Optional[int] = None, circular: bool = True) -> List[Question]:
    """The questions this run asks: the file's questions (MMBench expanded to its circular
    variants), the first ``limit`` of them, then this run's chunk."""
    questions = load_questions(question_file, benchmark)
    if benchmark in MMBENCH and circular:
        questions = circular_questions(questions)
    if limit is not None:
        questions = questions[:limit]
    return get_chunk(questions, num_chunks, chunk_idx)


def check_images(questions: Sequence[Question], image_folder: Optional[str]) -> None:
    """Every image file exists (checked before the model loads, so a wrong folder fails at once)."""
    files = list(OrderedDict.fromkeys(q.image for q in questions if isinstance(q.image, str)))  # each file once
    if not files:
        return
    if image_folder is not None and not os.path.isdir(image_folder):
        raise UserError(f"image folder {image_folder!r} does not exist")
    # Without --image_folder the paths are taken as they are (absolute, or relative to here).
    missing = [name for name in files if not os.path.isfile(os.path.join(image_folder or "", name))]
    if missing:
        show = ", ".join(repr(name) for name in missing[:3]) + (" ..." if len(missing) > 3 else "")
        if image_folder is None:
            raise UserError(f"{len(missing)} of {len(files)} image files of the questions are not found ({show}); "
                            f"pass --image_folder")
        raise UserError(f"{len(missing)} of {len(files)} images are not in {image_folder} ({show}); "
                        f"check --image_folder")


# ==============================================================================================
# Command line
# ==============================================================================================

def build_parser() -> argparse.ArgumentParser:
    from visualrwkv.generation.chat import add_compile_arg

    p = argparse.ArgumentParser(
        prog="visualrwkv eval",
        description="Answer a benchmark's questions with batched greedy decoding and write a JSONL answer file "
                    "for 'visualrwkv score'. Resumable: already answered questions are skipped.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_path", "--model-path", default=None, help="VisualRWKV checkpoint (.pth or .safetensors)")
    g.add_argument("--vision_tower_name", "--vision-tower-name", default=None,
                   help="the CLIP tower the model was trained with: a hub name or a local folder")
    g.add_argument("--grid_size", type=int, default=-1,
                   help="image token pooling the model was trained with (default -1)")
    g.add_argument("--image_position", default="middle", choices=["first", "middle", "last"],
                   help="where the image goes in the prompt, as in training (default middle)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp32 on CPU, bf16 on GPU")
    add_compile_arg(g)
    g.add_argument("--model_id", default=None,
                   help="name written into every answer (default: the checkpoint's file name)")

    g = p.add_argument_group("questions and answers")
    g.add_argument("--benchmark", default="custom", choices=BENCHMARKS,
                   help="decides the prompt suffix and the answer fields (default custom: the prompts as in the file)")
    g.add_argument("--question_file", "--question-file", default=None, help="questions: .jsonl, .json or MMBench .tsv")
    g.add_argument("--image_folder", "--image-folder", default=None,
                   help="folder the question file's image paths are relative to")
    g.add_argument("--output_file", "--answers_file", "--answers-file", default=None,
                   help="answer file (JSONL); answers already in it are kept and their questions skipped")
    g.add_argument("--overwrite", action="store_true", help="start the answer file over instead of continuing it")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions (before chunking)")
    g.add_argument("--no_circular", action="store_true",
                   help="MMBench: ask each question once in its original option order (default: every rotation)")

    g = p.add_argument_group("speed and splitting")
    g.add_argument("--batch_size", type=int, default=32, help="questions decoded together (default 32)")
    g.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    g.add_argument("--num_chunks", "--num-chunks", type=int, default=1,
                   help="split the questions into this many chunks (one per GPU)")
    g.add_argument("--chunk_idx", "--chunk-idx", type=int, default=0, help="which chunk this run answers (0-based)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="threads reading and preprocessing images (default min(4, CPU cores); 0 = none)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("merging chunk files")
    g.add_argument("--merge", nargs="+", metavar="CHUNK_FILE", default=None,
                   help="join these answer files into --output_file (no model needed; with --question_file the "
                        "answers follow the question order and unanswered questions are counted)")
    return p


def _check_args(args) -> None:
    if args.output_file is None:
        raise UserError("--output_file is required (the JSONL answer file to write)")
    if args.merge is not None:
        return
    needed = (("--model_path", args.model_path), ("--vision_tower_name", args.vision_tower_name),
              ("--question_file", args.question_file))
    missing = [flag for flag, value in needed if not value]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    if args.num_chunks < 1:
        raise UserError(f"--num_chunks must be at least 1, got {args.num_chunks}")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise UserError(f"--chunk_idx must be in 0..{args.num_chunks - 1}, got {args.chunk_idx}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not os.path.isfile(args.model_path):
        raise UserError(f"model file not found: {args.model_path}" if not os.path.isdir(args.model_path)
                        else f"--model_path {args.model_path} is a folder; pass the .pth / .safetensors file")
    if os.path.isdir(args.output_file):
        raise UserError(f"--output_file {args.output_file} is a folder; pass a .jsonl file name")
    from visualrwkv.generation.pipeline import resolve_device

    resolve_device(args.device)  # no GPU when one is asked for: say so before reading anything big


def _run_merge(args) -> int:
    questions = None
    if args.question_file:
        questions = select_questions(args.question_file, args.benchmark, limit=args.limit,
                                     circular=not args.no_circular)
    n, dropped, missing = merge_answer_files(args.merge, args.output_file, args.benchmark, questions)
    print(f"merged {len(args.merge)} files: {n} answers -> {args.output_file}"
          + (f" ({dropped} duplicates dropped)" if dropped else ""))
    if questions is not None:
        print(f"{missing} of {len(questions)} questions have no answer" if missing
              else f"all {len(questions)} questions are answered")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    _check_args(args)
    if args.merge is not None:
        return _run_merge(args)

    # Everything cheap is checked before the model loads.
    questions = select_questions(args.question_file, args.benchmark, args.num_chunks, args.chunk_idx, args.limit,
                                 circular=not args.no_circular)
    check_images(questions, args.image_folder)
    model_id = args.model_id or os.path.splitext(os.path.basename(args.model_path))[0]
    if args.overwrite and os.path.exists(args.output_file):
        os.remove(args.output_file)
    existing = read_answer_file(args.output_file, repair=True)
    others = sorted({str(r.get("model_id")) for r in existing if r.get("model_id") not in (None, model_id)})
    if others:
        raise UserError(f"{args.output_file} already holds answers of model {others[0]!r} (this run is {model_id!r}); "
                        f"use another --output_file, or --overwrite to start it over")
    done: Set[str] = {record_key(r, args.benchmark) for r in existing}
    todo = [q for q in questions if question_key(q, args.benchmark) not in done]
    where = f" (chunk {args.chunk_idx} of {args.num_chunks})" if args.num_chunks > 1 else ""
    if not questions:
        print(f"no questions to answer{where}; nothing to do")
        return 0
    if not todo:
        print(f"all {len(questions)} questions{where} are already answered in {args.output_file}")
        return 0
    if len(todo) < len(questions):
        print(f"{len(questions) - len(todo)} of {len(questions)} questions{where} already answered; "
              f"answering the other {len(todo)}", file=sys.stderr)

    from visualrwkv.generation.chat import compile_flag
    from visualrwkv.generation.pipeline import Pipeline
    from visualrwkv.generation.sampling import SamplingParams

    # With the image first, the prompt up to the image ("User: <image>") is the same for every
    # question about that image, so its state is worth keeping; with middle / last the question
    # text comes before the image and no two prompts share the image prefix.
    prefix_cache = min(args.batch_size, 16) if args.image_position == "first" else 0
    pipe = Pipeline.load(args.model_path, args.vision_tower_name, grid_size=args.grid_size,
                         image_position=args.image_position, device=args.device, dtype=args.dtype,
                         prefix_cache_size=prefix_cache, max_batch_size=args.batch_size, compile=compile_flag(args))
    params = SamplingParams.greedy(args.max_new_tokens)
    jobs = group_by_image([Job(q, q.prompt, q.image, params, f"question {q.id!r}") for q in todo])
    workers = args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1)

    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    os.makedirs(out_dir, exist_ok=True)
    from tqdm import tqdm

    start = time.perf_counter()
    n = 0
    with open(args.output_file, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), unit="q", desc=f"{args.benchmark}{where}", disable=args.no_progress,
                 dynamic_ncols=True, file=sys.stderr) as bar:
        for job, result in answer_jobs(pipe, jobs, args.batch_size, args.image_folder, workers):
            f.write(_json_line(answer_record(job.tag, result, model_id)))
            f.flush()  # an answer on disk survives a crash of the run
            n += 1
            bar.update(1)
    elapsed = time.perf_counter() - start
    print(f"answered {n} questions in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.2f} questions/s) -> {args.output_file}")
    return 0


if __name__ == "__main__":
    from visualrwkv.cli import main as cli_main

    sys.exit(cli_main(["eval"] + sys.argv[1:]))
