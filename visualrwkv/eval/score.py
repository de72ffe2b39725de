"""``visualrwkv score``: score an answer file with the benchmark's official metric (SPEC §8).

The answer file is what ``visualrwkv eval`` writes (JSONL: question_id, prompt, text, model_id).
The results table is printed; ``--output`` also writes it as JSON, ``--submission`` writes the
file an evaluation server wants (VQAv2, VizWiz, MMBench test splits have no public answers).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics import gqa as gqa_metric
from visualrwkv.eval.metrics import mme as mme_metric
from visualrwkv.eval.metrics import pope as pope_metric
from visualrwkv.eval.metrics import scienceqa as sqa_metric
from visualrwkv.eval.metrics import submission as sub
from visualrwkv.eval.metrics import vqa as vqa_metric
from visualrwkv.eval.metrics.common import Score, check_coverage, index_answers, load_answers
from visualrwkv.eval.metrics.mmbench import score_mmbench
from visualrwkv.eval.questions import (BENCHMARKS, IDS_MAY_REPEAT, Question, id_key, load_questions,
                                      strip_suffixes)

EPILOG = """\
what --annotations is, per benchmark:
  vqav2, textvqa  the official annotation json (VQAv2 val: {"annotations": [...]}; TextVQA_0.5.1_val.json)
  vizwiz          val.json (keyed by image: also pass --question_file)
  gqa             testdev_balanced_questions.json
  scienceqa       problems.json (or a question file whose records hold the answer)
  pope            the folder of coco_pope_{adversarial,popular,random}.json (+ --question_file for the splits)
  mme             the MME_Benchmark_release_version folder
  mmbench(_cn)    not needed: --question_file is the MMBench tsv with its 'answer' column
  custom          a json/jsonl of {question_id, answer(s)}, or answers inside --question_file

examples:
  visualrwkv score --benchmark textvqa \\
      --answers ./playground/data/eval/textvqa/answers/visualrwkv-v060-1b6.jsonl \\
      --annotations ./playground/data/eval/textvqa/TextVQA_0.5.1_val.json \\
      --question_file ./playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \\
      --output ./results/textvqa.json
  visualrwkv score --benchmark pope --answers ./playground/data/eval/pope/answers/visualrwkv-v060-1b6.jsonl \\
      --annotations ./playground/data/eval/pope/coco --question_file ./playground/data/eval/pope/llava_pope_test.jsonl
  visualrwkv score --benchmark mmbench --answers ./playground/data/eval/mmbench/answers/visualrwkv-v060-1b6.jsonl \\
      --question_file ./playground/data/eval/mmbench/mmbench_dev_20230712.tsv
  visualrwkv score --benchmark vqav2 --answers ./playground/data/eval/vqav2/answers/visualrwkv-v060-1b6.jsonl \\
      --question_file ./playground/data/eval/vqav2/llava_vqav2_mscoco_test2015.jsonl \\
      --submission ./playground/data/eval/vqav2/answers_upload/visualrwkv-v060-1b6.json
"""

SUBMISSION_BENCHMARKS = ("vqav2", "vizwiz", "mmbench", "mmbench_cn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visualrwkv score", description="Score an answer file with the benchmark's official metric.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="which benchmark the answers are for")
    p.add_argument("--answers", required=True, help="answer file (JSONL: question_id, prompt, text, model_id)")
    p.add_argument("--annotations", default=None, help="ground truth file or folder (see below)")
    p.add_argument("--question_file", default=None,
                   help="the question file the answers were made from (.jsonl / .json / .tsv); needed to match "
                        "POPE splits, VizWiz images, MMBench options; makes unanswered questions an error")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--submission", default=None,
                   help="write the evaluation-server file: vqav2/vizwiz .json, mmbench .xlsx/.tsv/.csv")
    p.add_argument("--allow_missing", action="store_true",
                   help="score only the answered questions when --question_file has more")
    return p


def _gold_answers_from_questions(questions: Dict[str, Question]) -> List[Dict[str, Any]]:
    """VQA-style annotations ({question_id, answers}) taken from a question file's records."""
    out = []
    for q in questions.values():
        raw = q.meta.get("answers")
        if isinstance(raw, list) and raw:
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in raw]
        elif q.answer is not None:
            answers = [q.answer]
        else:
            continue
        out.append({"question_id": q.id, "answers": answers})
    return out


def _need(value: Any, message: str) -> Any:
    if not value:
        raise UserError(message)
    return value


def score_answers(benchmark: str, answers: List[Dict[str, Any]], annotations: Optional[str],
                  questions: Optional[List[Question]], allow_missing: bool = False) -> Score:
    """Score loaded answers. ``annotations`` is a path (or None); ``questions`` the loaded question file."""
    if benchmark in ("mmbench", "mmbench_cn"):
        if questions is None:
            if annotations is None:
                raise UserError(f"{benchmark} needs --question_file: the MMBench tsv with its 'answer' column")
            questions = load_questions(annotations, benchmark)
        return score_mmbench(answers, questions, benchmark, allow_missing=allow_missing)

    if benchmark in IDS_MAY_REPEAT:
        # LLaVA's ids repeat across the questions of one image: a question is its id and its text.
        seen: Dict[str, Any] = {}
        for a in answers:
            key = id_key(a["question_id"]) + "#" + " ".join(strip_suffixes(str(a.get("prompt", ""))).split())
            if key in seen:
                raise UserError(f"answer file line {a['_line']}: second answer for question {a['question_id']!r} "
                                f"(first on line {seen[key]['_line']})")
            seen[key] = a
    else:
        index_answers(answers)  # two answers to one question are an error
    qmap = {id_key(q.id): q for q in questions} if questions is not None else None
    missing = []
    if questions is not None:
        missing = check_coverage(questions, {id_key(a["question_id"]): a for a in answers}, allow_missing)

    if benchmark in ("vqav2", "textvqa", "vizwiz", "custom"):
        if annotations:
            gold = vqa_metric.load_vqa_annotations(annotations)
        else:
            gold = _need(_gold_answers_from_questions(qmap or {}),
                         f"{benchmark} needs --annotations (or a --question_file whose records hold the answers)")
        result = vqa_metric.score_vqa(benchmark, answers, gold, qmap)
    elif benchmark == "gqa":
        gold = (gqa_metric.load_gqa_annotations(annotations) if annotations
                else _need(gqa_metric.gold_from_questions(qmap or {}),
                           "gqa needs --annotations testdev_balanced_questions.json"))
        result = gqa_metric.score_gqa(answers, gold)
    elif benchmark == "scienceqa":
        gold = (sqa_metric.load_scienceqa_annotations(annotations) if annotations
                else _need(sqa_metric.gold_from_questions(qmap or {}),
                           "scienceqa needs --annotations problems.json (or a --question_file with answers)"))
        result = sqa_metric.score_scienceqa(answers, gold, qmap)
    elif benchmark == "pope":
        labels = (pope_metric.load_pope_labels(annotations) if annotations
                  else _need(pope_metric.labels_from_questions(qmap or {}),
                             "pope needs --annotations (the coco_pope label folder) or labels in --question_file"))
        result = pope_metric.score_pope(answers, labels, qmap)
    elif benchmark == "mme":
        gt = (mme_metric.load_mme_ground_truth(annotations) if annotations
              else _need(mme_metric.ground_truth_from_questions(qmap or {}),
                         "mme needs --annotations (the MME_Benchmark_release_version folder)"))
        result = mme_metric.score_mme(answers, gt, qmap)
    else:  # pragma: no cover - argparse restricts the choices
        raise UserError(f"unknown benchmark {benchmark!r}")
    if missing:
        result.notes.append(f"{len(missing)} questions of the question file had no answer and were left out")
    return result


def write_submission(benchmark: str, path: str, answers: List[Dict[str, Any]],
                     questions: Optional[List[Question]]) -> int:
    """Write the evaluation-server file; returns the number of records written."""
    if benchmark == "vqav2":
        records = sub.vqav2_submission(answers, questions)
        sub.write_json_submission(path, records)
        return len(records)
    if benchmark == "vizwiz":
        if questions is None:
            raise UserError("a VizWiz submission needs --question_file (the answers are keyed by image)")
        records = sub.vizwiz_submission(answers, questions)
        sub.write_json_submission(path, records)
        return len(records)
    if benchmark in ("mmbench", "mmbench_cn"):
        if questions is None:
            raise UserError("an MMBench submission needs --question_file (the MMBench tsv)")
        sub.write_mmbench_submission(path, answers, questions)
        return len(questions)
    raise UserError(f"--submission: {benchmark} has no evaluation-server format; choose one of "
                    f"{', '.join(SUBMISSION_BENCHMARKS)}")


def _has_gold(benchmark: str, annotations: Optional[str], questions: Optional[List[Question]]) -> bool:
    """Whether there is ground truth to score against (test splits have none)."""
    if benchmark in ("mmbench", "mmbench_cn"):
        if questions is None:
            return annotations is not None
        return all(q.answer is not None for q in questions)
    if annotations is not None:
        return True
    return questions is not None and any(q.answer is not None or q.meta.get("answers") or q.meta.get("gpt_answer")
                                         for q in questions)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    answers = load_answers(args.answers)
    questions = load_questions(args.question_file, args.benchmark) if args.question_file else None
    if args.annotations is not None and not os.path.exists(args.annotations):
        raise UserError(f"annotations {args.annotations!r} do not exist")

    if args.submission:
        n = write_submission(args.benchmark, args.submission, answers, questions)
        print(f"wrote {n} records to {args.submission}")
    if not _has_gold(args.benchmark, args.annotations, questions):
        if args.submission:
            return 0  # a test split: the submission is all that can be made
        raise UserError("nothing to score against: pass --annotations, or a --question_file whose records hold "
                        "the answers" + (", or --submission for the evaluation server"
                                         if args.benchmark in SUBMISSION_BENCHMARKS else ""))

    result = score_answers(args.benchmark, answers, args.annotations, questions, args.allow_missing)
    print(result.table())
    if args.output:
        out = result.to_dict()
        models = sorted({str(a.get("model_id")) for a in answers if a.get("model_id") is not None})
        out.update({"answers": os.path.abspath(args.answers),
                    "model_id": models[0] if len(models) == 1 else (models or None),
                    "annotations": os.path.abspath(args.annotations) if args.annotations else None,
                    "question_file": os.path.abspath(args.question_file) if args.question_file else None})
        d = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(d, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    import sys

    from visualrwkv.cli import main as cli_main

    sys.exit(cli_main(["score"] + sys.argv[1:]))
