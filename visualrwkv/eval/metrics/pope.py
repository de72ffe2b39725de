"""POPE: object-hallucination yes/no questions in three splits (adversarial, popular, random).

Per split: accuracy, precision, recall, F1 (positive class "yes") and the yes-ratio (share of
"yes" predictions); the overall numbers are the means over the splits (the paper's POPE number
is the mean F1).

A reply is read as LLaVA's eval_pope does: keep the text before the first '.', drop commas, split
on spaces; the words "No", "no" or "not" make it "no", anything else is "yes".

Labels come from POPE's ``coco_pope_<split>.json`` files (JSON lines with question_id, image,
text, label; pass their folder as --annotations), from one such file, or from ``label`` fields in
the question file. The split of an answer is its question's ``category``. Answers are matched to
labels by (split, image, question text), then by (split, question_id) -- LLaVA's
llava_pope_test.jsonl numbers questions differently from the coco_pope files.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, pct, read_json_file
from visualrwkv.eval.questions import Question, id_key, strip_suffixes


def parse_pope_answer(text: str) -> str:
    """'yes' or 'no', exactly as LLaVA's eval_pope reads a reply."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def _norm_text(text: str) -> str:
    return " ".join(strip_suffixes(text).split()).lower()


def _norm_label(label: Any, where: str) -> str:
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower()
    raise UserError(f"{where}: label must be 'yes' or 'no', got {label!r}")


def _split_of_file(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem[len("coco_pope_"):] if stem.startswith("coco_pope_") else stem


def load_pope_labels(path: str) -> List[Dict[str, Any]]:
    """Label records {split, question_id, image, text, label} from a folder of coco_pope_*.json
    files or from one labelled file (split = the record's ``category``, else the file name)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
        if not files:
            raise UserError(f"{path}: no coco_pope_<split>.json files in the folder")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"annotations {path!r} do not exist")
    out: List[Dict[str, Any]] = []
    for f in files:
        data = read_json_file(f, "POPE label file")
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f"{f}: expected JSON lines of {{question_id, image, text, label}}")
        for i, rec in enumerate(data):
            where = f"{f}: record {i}"
            if not isinstance(rec, dict) or "label" not in rec:
                raise UserError(f"{where}: expected an object with a 'label'")
            out.append({"split": str(rec.get("category") or _split_of_file(f)),
                        "question_id": rec.get("question_id"), "image": rec.get("image"),
                        "text": rec.get("text", rec.get("question")), "label": _norm_label(rec["label"], where)})
    return out


def labels_from_questions(questions: Dict[str, Question]) -> List[Dict[str, Any]]:
    return [{"split": q.category or "all", "question_id": q.id, "image": q.image, "text": q.question,
             "label": _norm_label(q.answer, f"question {q.id!r}")}
            for q in questions.values() if q.answer is not None]


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> Dict[str, float]:
    """Confusion counts and the five POPE numbers (percent) for one split. Precision (or F1) with
    no "yes" prediction is 0 (LLaVA's script divides by zero there)."""
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(tp + tn, n), "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "yes_ratio": pct(tp + fp, n), "TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": n}


def score_pope(answers: Sequence[Dict[str, Any]], labels: Sequence[Dict[str, Any]],
               questions: Optional[Dict[str, Question]] = None) -> Score:
    by_text: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    by_qid: Dict[Tuple[str, str], Dict[str, Any]] = {}
    qid_splits: Dict[str, set] = {}
    for rec in labels:
        if rec.get("image") is not None and isinstance(rec.get("text"), str):
            by_text[(rec["split"], os.path.basename(str(rec["image"])), _norm_text(rec["text"]))] = rec
        if rec.get("question_id") is not None:
            by_qid[(rec["split"], id_key(rec["question_id"]))] = rec
            qid_splits.setdefault(id_key(rec["question_id"]), set()).add(rec["split"])

    per_split: Dict[str, Tuple[List[str], List[str]]] = {}
    unmatched = []
    for a in answers:
        key = id_key(a["question_id"])
        q = questions.get(key) if questions else None
        split = (q.category if q is not None and q.category else None) or a.get("category")
        rec = None
        if split is not None:
            if q is not None and isinstance(q.image, str):
                rec = by_text.get((str(split), os.path.basename(q.image), _norm_text(q.question)))
            if rec is None:
                rec = by_qid.get((str(split), key))
        elif len(qid_splits.get(key, ())) == 1:  # no split known: the id must be unambiguous
            rec = by_qid[(next(iter(qid_splits[key])), key)]
        if rec is None:
            unmatched.append(a["question_id"])
            continue
        preds, golds = per_split.setdefault(rec["split"], ([], []))
        preds.append(parse_pope_answer(a["text"]))
        golds.append(rec["label"])
    if not per_split:
        raise UserError(f"none of the {len(answers)} answers matched a POPE label (ids such as "
                        f"{answers[0]['question_id']!r}); pass the question file (it gives each answer's "
                        f"split, image and text) and the coco_pope label folder")
    groups = {s: pope_metrics(p, g) for s, (p, g) in sorted(per_split.items())}
    metrics: Dict[str, float] = {}
    for k in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        metrics[k] = sum(m[k] for m in groups.values()) / len(groups)
    metrics["n"] = sum(m["n"] for m in groups.values())
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} answers matched no label and were left out (e.g. {unmatched[0]!r})")
    if len(groups) > 1:
        notes.append(f"overall numbers are the means over the {len(groups)} splits")
    return Score(benchmark="pope", headline="f1", metrics=metrics, groups={"split": groups}, notes=notes)
