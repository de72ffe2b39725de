"""GQA (testdev-balanced): exact match after normalisation.

LLaVA converts each prediction with ``text.rstrip('.').lower()`` and hands it to the official GQA
``eval.py``, which counts ``prediction == answer``. That is the headline ``accuracy`` here (the
gold answer is lower-cased too; GQA answers already are). ``accuracy_normalised`` is a more
lenient variant that also drops punctuation and the articles a/an/the on both sides
("The left." == "left"); it is reported for information only.
"""
from __future__ import annotations

import re
import string
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, group_metrics, pct, read_json_file
from visualrwkv.eval.questions import Question, id_key

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_ARTICLE = re.compile(r"\b(a|an|the)\b")


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's conversion for the GQA evaluator: trailing periods removed, lower-cased."""
    return text.strip().rstrip(".").strip().lower()


def normalize_gqa_lenient(text: str) -> str:
    """Lower-case, punctuation removed, articles removed, whitespace collapsed."""
    t = _PUNCT.sub(" ", text.lower())
    t = _ARTICLE.sub(" ", t)
    return " ".join(t.split())


def load_gqa_annotations(path: str) -> Dict[str, Dict[str, Any]]:
    """question id -> {answer, types?}. Reads the official ``testdev_balanced_questions.json``
    (an object keyed by question id) or a list / JSONL of ``{question_id, answer}`` records."""
    data = read_json_file(path, "annotation file")
    out: Dict[str, Dict[str, Any]] = {}
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise UserError(f"{path}: record {i}: expected an object")
            qid = rec.get("question_id", rec.get("questionId", rec.get("id")))
            if qid is None:
                raise UserError(f"{path}: record {i}: no question_id")
            items.append((qid, rec))
    else:
        raise UserError(f"{path}: expected GQA questions (an object keyed by question id) or a list")
    for qid, rec in items:
        if not isinstance(rec, dict) or not isinstance(rec.get("answer"), str):
            raise UserError(f"{path}: not GQA ground truth: entry {qid!r} has no string 'answer' (expected "
                            f"testdev_balanced_questions.json or a list of {{question_id, answer}})")
        item: Dict[str, Any] = {"answer": rec["answer"]}
        if isinstance(rec.get("types"), dict):
            item["types"] = rec["types"]
        out[id_key(qid)] = item
    if not out:
        raise UserError(f"{path}: no GQA questions found")
    return out


def gold_from_questions(questions: Dict[str, Question]) -> Dict[str, Dict[str, Any]]:
    """Ground truth taken from a question file whose records carry an ``answer``."""
    return {k: {"answer": q.answer} for k, q in questions.items() if q.answer is not None}


def score_gqa(answers: Sequence[Dict[str, Any]], gold: Dict[str, Dict[str, Any]]) -> Score:
    exact: List[bool] = []
    lenient: List[bool] = []
    structural: List[Tuple[Optional[str], bool]] = []
    semantic: List[Tuple[Optional[str], bool]] = []
    unmatched = []
    for a in answers:
        g = gold.get(id_key(a["question_id"]))
        if g is None:
            unmatched.append(a["question_id"])
            continue
        ok = normalize_gqa_answer(a["text"]) == normalize_gqa_answer(g["answer"])
        exact.append(ok)
        lenient.append(normalize_gqa_lenient(a["text"]) == normalize_gqa_lenient(g["answer"]))
        types = g.get("types") or {}
        structural.append((types.get("structural"), ok))
        semantic.append((types.get("semantic"), ok))
    if not exact:
        raise UserError(f"none of the {len(answers)} answers matched a GQA question (ids such as "
                        f"{answers[0]['question_id']!r}); check --annotations")
    metrics = {"accuracy": pct(sum(exact), len(exact)), "accuracy_normalised": pct(sum(lenient), len(lenient)),
               "n": len(exact)}
    groups = {}
    for name, recs in (("structural", structural), ("semantic", semantic)):
        g = group_metrics(recs)
        if g:
            groups[name] = g
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} answers had no annotation and were left out (e.g. {unmatched[0]!r})")
    return Score(benchmark="gqa", headline="accuracy", metrics=metrics, groups=groups, notes=notes)
