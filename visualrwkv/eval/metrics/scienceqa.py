"""ScienceQA: multiple-choice accuracy, overall and on the questions with an image (SQA-IMG, the
number the paper reports).

The predicted letter is parsed from free text with ``parse_option_letter`` ("A", "A.", "(C)",
"The answer is B", an answer equal to an option's text). A reply that names no valid option counts
as wrong; LLaVA's evaluator does the same (older versions picked a random option instead).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, group_metrics, parse_option_letter, pct, read_json_file
from visualrwkv.eval.questions import OPTION_LETTERS, Question, id_key


def load_scienceqa_annotations(path: str) -> Dict[str, Dict[str, Any]]:
    """question id -> {answer (letter), options, has_image, subject?}.

    Reads ScienceQA's ``problems.json`` (an object keyed by problem id with ``choices``, ``answer``
    as an index, ``image``, ``subject``) or a list / JSONL of records with an id, ``answer`` (letter
    or index) and optionally ``choices`` and ``image``.
    """
    data = read_json_file(path, "annotation file")
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            qid = rec.get("question_id", rec.get("id", rec.get("pid"))) if isinstance(rec, dict) else None
            if qid is None:
                raise UserError(f"{path}: record {i}: expected an object with question_id / id")
            items.append((qid, rec))
    else:
        raise UserError(f"{path}: expected ScienceQA problems (an object keyed by id) or a list")
    out: Dict[str, Dict[str, Any]] = {}
    for qid, rec in items:
        where = f"{path}: problem {qid!r}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object")
        choices = rec.get("choices")
        options = {OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices)} if isinstance(choices, list) else {}
        ans = rec.get("answer")
        if isinstance(ans, int) and not isinstance(ans, bool):
            if not options or not 0 <= ans < len(options):
                raise UserError(f"{where}: answer index {ans} does not name one of its choices")
            letter = OPTION_LETTERS[ans]
        elif isinstance(ans, str) and ans.strip().upper() in OPTION_LETTERS:
            letter = ans.strip().upper()
        else:
            raise UserError(f"{where}: 'answer' must be an option index or letter, got {ans!r}")
        item = {"answer": letter, "options": options, "has_image": bool(rec.get("image"))}
        if rec.get("subject"):
            item["subject"] = str(rec["subject"])
        out[id_key(qid)] = item
    if not out:
        raise UserError(f"{path}: no ScienceQA problems found")
    return out


def gold_from_questions(questions: Dict[str, Question]) -> Dict[str, Dict[str, Any]]:
    """Ground truth from a question file: the record's ``answer`` or its gpt turn
    ("The answer is B." / "B")."""
    out = {}
    for k, q in questions.items():
        letter = None
        if q.answer is not None:
            letter = parse_option_letter(q.answer, q.options or None)
        elif isinstance(q.meta.get("gpt_answer"), str):
            letter = parse_option_letter(q.meta["gpt_answer"], q.options or None)
        if letter is not None:
            out[k] = {"answer": letter, "options": q.options, "has_image": q.image is not None}
    return out


def score_scienceqa(answers: Sequence[Dict[str, Any]], gold: Dict[str, Dict[str, Any]],
                    questions: Optional[Dict[str, Question]] = None) -> Score:
    correct: List[bool] = []
    img: List[bool] = []
    subjects: List[Tuple[Optional[str], bool]] = []
    unparsed = 0
    unmatched = []
    for a in answers:
        key = id_key(a["question_id"])
        g = gold.get(key)
        if g is None:
            unmatched.append(a["question_id"])
            continue
        options = g.get("options") or (questions[key].options if questions and key in questions else {})
        letter = parse_option_letter(a["text"], options or None)
        unparsed += letter is None
        ok = letter == g["answer"]
        correct.append(ok)
        if g.get("has_image"):
            img.append(ok)
        subjects.append((g.get("subject"), ok))
    if not correct:
        raise UserError(f"none of the {len(answers)} answers matched a ScienceQA question (ids such as "
                        f"{answers[0]['question_id']!r}); check --annotations / --question_file")
    metrics = {"img_accuracy": pct(sum(img), len(img)), "accuracy": pct(sum(correct), len(correct)),
               "n_img": len(img), "n": len(correct)}
    groups = {}
    subj = group_metrics(subjects)
    if subj:
        groups["subject"] = subj
    notes = []
    if unparsed:
        notes.append(f"{unparsed} answers named no valid option letter (counted wrong)")
    if unmatched:
        notes.append(f"{len(unmatched)} answers had no annotation and were left out (e.g. {unmatched[0]!r})")
    if not img:
        notes.append("no question with an image: img_accuracy is 0 (does the gold data mark images?)")
    return Score(benchmark="scienceqa", headline="img_accuracy", metrics=metrics, groups=groups, notes=notes)
