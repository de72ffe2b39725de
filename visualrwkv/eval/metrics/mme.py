"""MME: yes/no questions, two per image, in 14 subtasks.

Per subtask (as the official ``calculation.py``): accuracy = right answers / questions,
accuracy+ = images whose questions are all answered right / images, score = accuracy% +
accuracy+% (at most 200). Perception = sum of the 10 perception subtask scores (max 2000; the
number the paper reports), cognition = sum of the 4 cognition subtask scores (max 800).

A reply is read as the official script does: lower-cased; "yes"/"no" as is; otherwise "yes" if
its first four characters contain "yes", else "no" if they contain "no", else "other" (wrong).

Ground truth: the ``MME_Benchmark_release_version`` folder (each subtask folder has, per image, a
.txt file of "question<TAB>answer" lines, either next to the images or in questions_answers_YN/),
a JSON / JSONL file of {category, image, question, answer} records, or ``answer`` fields in the
question file. Answers are matched by (subtask, image name, question text) and then by question
id; LLaVA's question ids are "<subtask>/<image file>".
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, pct, read_json_file
from visualrwkv.eval.questions import Question, id_key, strip_suffixes

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """'yes', 'no' or 'other', as the official MME calculation reads a reply."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _norm_question(text: str) -> str:
    return " ".join(strip_suffixes(text).split()).lower()


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def load_mme_ground_truth(path: str) -> List[Dict[str, Any]]:
    """Records {category, image (stem), question, answer, question_id?}."""
    out: List[Dict[str, Any]] = []
    if os.path.isdir(path):
        for category in sorted(os.listdir(path)):
            cdir = os.path.join(path, category)
            if not os.path.isdir(cdir):
                continue
            qa_dir = os.path.join(cdir, "questions_answers_YN") if os.path.isdir(os.path.join(cdir, "images")) else cdir
            if not os.path.isdir(qa_dir):
                continue
            for fname in sorted(os.listdir(qa_dir)):
                if not fname.endswith(".txt"):
                    continue
                fpath = os.path.join(qa_dir, fname)
                with open(fpath, "r", encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        parts = line.rstrip("\n").rstrip("\r").split("\t")
                        if len(parts) != 2:
                            raise UserError(f"{fpath}:{lineno}: expected 'question<TAB>answer'")
                        answer = parts[1].strip().lower()
                        if answer not in ("yes", "no"):
                            raise UserError(f"{fpath}:{lineno}: answer must be Yes or No, got {parts[1]!r}")
                        out.append({"category": category, "image": _stem(fname), "question": parts[0],
                                    "answer": answer})
        if not out:
            raise UserError(f"{path}: no MME question/answer .txt files found in the subtask folders")
        return out
    data = read_json_file(path, "annotation file")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of {{category, image, question, answer}} records")
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object")
        answer = str(rec.get("answer", rec.get("label", ""))).strip().lower()
        if answer not in ("yes", "no"):
            raise UserError(f"{where}: answer must be yes or no, got {rec.get('answer')!r}")
        qid = rec.get("question_id")
        category = rec.get("category") or (str(qid).split("/")[0] if qid is not None and "/" in str(qid) else None)
        if not category:
            raise UserError(f"{where}: no category")
        image = rec.get("image") or (str(qid) if qid is not None else None)
        out.append({"category": str(category), "image": _stem(str(image)) if image else None,
                    "question": rec.get("question", rec.get("text")), "answer": answer, "question_id": qid})
    return out


def ground_truth_from_questions(questions: Dict[str, Question]) -> List[Dict[str, Any]]:
    out = []
    for q in questions.values():
        if q.answer is None:
            continue
        answer = q.answer.strip().lower()
        if answer not in ("yes", "no"):
            raise UserError(f"question {q.id!r}: MME answer must be yes or no, got {q.answer!r}")
        out.append({"category": q.category or str(q.id).split("/")[0],
                    "image": _stem(q.image) if isinstance(q.image, str) else None, "question": q.question,
                    "answer": answer, "question_id": q.id})
    return out


def score_mme(answers: Sequence[Dict[str, Any]], ground_truth: Sequence[Dict[str, Any]],
              questions: Optional[Dict[str, Question]] = None) -> Score:
    by_text: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    by_qid: Dict[str, Dict[str, Any]] = {}
    for rec in ground_truth:
        if rec.get("image") and isinstance(rec.get("question"), str):
            by_text[(rec["category"], rec["image"], _norm_question(rec["question"]))] = rec
        if rec.get("question_id") is not None:
            by_qid[id_key(rec["question_id"])] = rec

    # subtask -> image -> list of (correct)
    results: Dict[str, Dict[str, List[bool]]] = {}
    unmatched = []
    other = 0
    for a in answers:
        key = id_key(a["question_id"])
        q = questions.get(key) if questions else None
        # Subtask: the question's category, else the answer's, else the prefix of a LLaVA id.
        category = ((q.category if q is not None else None) or a.get("category")
                    or (key.split("/")[0] if "/" in key else None))
        image = _stem(q.image) if q is not None and isinstance(q.image, str) else (_stem(key) if "/" in key else None)
        # The answer's own prompt first: LLaVA's ids are shared by the two questions of an image.
        text = str(a.get("prompt") or (q.question if q is not None else ""))
        rec = by_text.get((str(category), image, _norm_question(text))) if category and image else None
        if rec is None:
            rec = by_qid.get(key)
        if rec is None:
            unmatched.append(a["question_id"])
            continue
        pred = parse_mme_answer(a["text"])
        other += pred == "other"
        results.setdefault(rec["category"], {}).setdefault(rec["image"] or key, []).append(pred == rec["answer"])
    if not results:
        raise UserError(f"none of the {len(answers)} answers matched an MME question (ids such as "
                        f"{answers[0]['question_id']!r}); check --annotations / --question_file")

    subtasks: Dict[str, Dict[str, float]] = {}
    for category in sorted(results, key=lambda c: (c not in PERCEPTION, c not in COGNITION, c)):
        images = results[category]
        flags = [ok for v in images.values() for ok in v]
        acc = pct(sum(flags), len(flags))
        acc_plus = pct(sum(all(v) for v in images.values()), len(images))
        subtasks[category] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus,
                              "n": len(flags), "images": len(images)}
    perception = sum(m["score"] for c, m in subtasks.items() if c in PERCEPTION)
    cognition = sum(m["score"] for c, m in subtasks.items() if c in COGNITION)
    metrics = {"perception": perception, "cognition": cognition, "total": perception + cognition,
               "n": sum(int(m["n"]) for m in subtasks.values())}
    notes = []
    missing = [c for c in PERCEPTION + COGNITION if c not in subtasks]
    if missing:
        notes.append(f"subtasks without answers (not in the totals): {', '.join(missing)}")
    unknown = [c for c in subtasks if c not in PERCEPTION + COGNITION]
    if unknown:
        notes.append(f"subtasks outside MME's 14 (not in the totals): {', '.join(unknown)}")
    odd = [f"{c}/{img}" for c, imgs in results.items() for img, v in imgs.items() if len(v) != 2]
    if odd:
        notes.append(f"{len(odd)} images do not have exactly 2 answered questions (e.g. {odd[0]})")
    if other:
        notes.append(f"{other} replies were neither yes nor no (counted wrong)")
    if unmatched:
        notes.append(f"{len(unmatched)} answers matched no ground truth and were left out (e.g. {unmatched[0]!r})")
    return Score(benchmark="mme", headline="perception", metrics=metrics, groups={"subtask": subtasks}, notes=notes)
