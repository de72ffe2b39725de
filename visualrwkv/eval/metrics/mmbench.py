"""MMBench / MMBench-CN: circular multiple-choice evaluation.

Each question is asked once per rotation of its options (A B C D, B C D A, ...). A question
counts as right only when every rotation that was asked is answered with the right letter; the
circular accuracy is the share of right questions, overall, per ``category`` and per
``l2-category``. ``vanilla_accuracy`` scores only the original option order (round 0).

Rotations are found in three ways: rows of the question tsv with ``index + k * 1e6`` (legacy
MMBench files), answers to the variants made by ``questions.circular_questions`` (ids
``index + k * 1e6``), or answers with a ``round_id`` (LLaVA's ``--all-rounds``: rotation k shifts
the options left by k). The reference letter of a rotation moves with its option.

The official evaluator falls back to ChatGPT when the letter cannot be read from the reply; here
such a reply is simply wrong (and counted in the notes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, group_metrics, index_answers, parse_option_letter, pct
from visualrwkv.eval.questions import CIRCULAR_STRIDE, Question, circular_questions, id_key, rotate_question


def score_mmbench(answers: Sequence[Dict[str, Any]], questions: Sequence[Question], benchmark: str = "mmbench",
                  allow_missing: bool = False) -> Score:
    """Circular accuracy of ``answers`` on the MMBench ``questions`` (as loaded from the tsv)."""
    if not questions:
        raise UserError("no MMBench questions")
    if any(q.answer is None for q in questions):
        raise UserError("the question file has no 'answer' column (MMBench test split): it cannot be scored "
                        "here; make a submission file with --submission instead")
    # Every question the answers may refer to: the file's rows and the generated rotations.
    by_id: Dict[str, Question] = {id_key(q.id): q for q in questions}
    for q in circular_questions(questions):
        by_id.setdefault(id_key(q.id), q)

    index_answers(answers, with_round=True)  # rejects two answers to the same question and round
    groups: Dict[str, List[Tuple[Question, bool]]] = {}
    unmatched = []
    unparsed = 0
    for a in answers:
        key = id_key(a["question_id"])
        q = by_id.get(key)
        if q is None:
            unmatched.append(a["question_id"])
            continue
        r = int(a.get("round_id", 0) or 0)
        if r:
            q = rotate_question(q, r)  # LLaVA --all-rounds: rotation r of the row it names
        letter = parse_option_letter(a["text"], q.options)
        unparsed += letter is None
        groups.setdefault(id_key(q.main_index), []).append((q, letter == q.answer))
    if not groups:
        raise UserError(f"none of the {len(answers)} answers matched an MMBench question (ids such as "
                        f"{answers[0]['question_id']!r}); check --question_file")

    # Main questions of the file that got no answer at all.
    mains = {id_key(q.main_index): q for q in questions}
    missing = [k for k in mains if k not in groups]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} of {len(mains)} MMBench questions have no answer (e.g. index "
                        f"{missing[0]}); pass --allow_missing to score only the answered ones")

    circ: List[Tuple[Question, bool]] = []
    vanilla: List[bool] = []
    incomplete = 0
    for key, items in groups.items():
        first = items[0][0]
        circ.append((first, all(ok for _, ok in items)))
        n_rounds = len({q.round_id for q, _ in items})
        incomplete += n_rounds < len(first.options)
        vanilla.extend(ok for q, ok in items if q.round_id == 0)

    metrics = {"circular_accuracy": pct(sum(ok for _, ok in circ), len(circ)),
               "vanilla_accuracy": pct(sum(vanilla), len(vanilla)), "questions": len(circ),
               "answers": sum(len(v) for v in groups.values())}
    breakdown = {}
    cat = group_metrics((q.category, ok) for q, ok in circ)
    if cat:
        breakdown["category"] = cat
    l2 = group_metrics((q.meta.get("l2-category"), ok) for q, ok in circ)
    if l2:
        breakdown["l2-category"] = l2
    notes = []
    if incomplete:
        notes.append(f"{incomplete} questions were not asked in all their rotations (judged on those asked; "
                     f"use circular_questions() when answering for a full circular evaluation)")
    if unparsed:
        notes.append(f"{unparsed} replies named no valid option letter (counted wrong)")
    if missing:
        notes.append(f"{len(missing)} questions had no answer and were left out")
    if unmatched:
        notes.append(f"{len(unmatched)} answers matched no question and were left out (e.g. {unmatched[0]!r})")
    return Score(benchmark=benchmark, headline="circular_accuracy", metrics=metrics, groups=breakdown, notes=notes)


__all__ = ["score_mmbench", "CIRCULAR_STRIDE"]
