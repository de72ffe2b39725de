"""Shared pieces of the benchmark scorers: answer files, the result record, option-letter parsing."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.questions import Question, id_key


# --------------------------------------------------------------------------------------------
# Answer files
# --------------------------------------------------------------------------------------------

def load_answers(path: str) -> List[Dict[str, Any]]:
    """Read an answer file: JSONL with ``question_id``, ``prompt``, ``text``, ``model_id`` per line
    (``round_id`` too for MMBench answers made with LLaVA's --all-rounds).

    Each record gets ``_line`` (its line number). Bad JSON, a missing ``question_id`` / ``text``
    or a non-string ``text`` raise UserError with file and line.
    """
    if not os.path.isfile(path):
        raise UserError(f"answer file {path!r} does not exist")
    if os.path.splitext(path)[1].lower() not in (".jsonl", ".json", ".txt", ""):
        raise UserError(f"{path}: answer files are JSONL (one {{question_id, prompt, text, model_id}} per line)")
    answers: List[Dict[str, Any]] = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); answer files are JSONL, one "
                                    f"object per line") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                if "question_id" not in rec:
                    raise UserError(f"{path}:{lineno}: answer has no 'question_id'")
                if not isinstance(rec.get("text"), str):
                    raise UserError(f"{path}:{lineno}: answer has no string 'text' field")
                r = rec.get("round_id", 0)
                if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
                    raise UserError(f"{path}:{lineno}: round_id must be a non-negative integer, got {r!r}")
                rec["_line"] = lineno
                answers.append(rec)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not answers:
        raise UserError(f"{path}: the answer file is empty")
    return answers


def answer_key(answer: Dict[str, Any], with_round: bool = False) -> str:
    key = id_key(answer["question_id"])
    if with_round:
        key += "#" + str(int(answer.get("round_id", 0) or 0))
    return key


def index_answers(answers: Sequence[Dict[str, Any]], with_round: bool = False) -> Dict[str, Dict[str, Any]]:
    """question id (and round) -> answer. Two answers to the same question are an error."""
    out: Dict[str, Dict[str, Any]] = {}
    for a in answers:
        key = answer_key(a, with_round)
        if key in out:
            raise UserError(f"answer file line {a.get('_line', '?')}: second answer for question "
                            f"{a['question_id']!r} (first on line {out[key].get('_line', '?')})")
        out[key] = a
    return out


def check_coverage(questions: Sequence[Question], answers: Dict[str, Dict[str, Any]], allow_missing: bool,
                   with_round: bool = False) -> List[Question]:
    """The questions without an answer. They are an error unless ``allow_missing``; then they are
    left out of the scores and the caller reports how many."""
    missing = [q for q in questions if (id_key(q.id) + (f"#{q.round_id}" if with_round else "")) not in answers]
    if missing and not allow_missing:
        ids = ", ".join(repr(q.id) for q in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} of {len(questions)} questions have no answer ({ids}); pass "
                        f"--allow_missing to score only the answered ones")
    return missing


def read_json_file(path: str, what: str) -> Any:
    """A .json file (any top-level value) or a .jsonl file (returned as a list)."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder; expected a .json or .jsonl file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                out = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                return out
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                # POPE's coco_pope_*.json files are JSON lines despite the extension.
                f.seek(0)
                out = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except json.JSONDecodeError:
                            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
                return out
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class Score:
    """The result of scoring one answer file.

    metrics  -- overall numbers, in the order they are printed. Accuracies / precision / recall /
                F1 / yes-ratio are percentages (0-100); MME scores are points (acc% + acc+%);
                counts are plain numbers.
    headline -- the key of ``metrics`` that the paper reports (SPEC §10).
    groups   -- breakdowns: name -> group -> metrics (e.g. "answer_type" -> "yes/no" -> {...}).
    notes    -- things the user should know (unmatched answers, unparsable predictions, ...).
    """

    benchmark: str
    headline: str
    metrics: Dict[str, float]
    groups: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"benchmark": self.benchmark, "headline": self.headline,
                "headline_value": self.metrics.get(self.headline), "metrics": dict(self.metrics),
                "groups": {k: {g: dict(m) for g, m in v.items()} for k, v in self.groups.items()},
                "notes": list(self.notes)}

    def table(self) -> str:
        """A plain-text results table."""
        lines = [f"benchmark: {self.benchmark}    headline: {self.headline} = {_fmt(self.metrics.get(self.headline))}",
                 ""]
        width = max(len(k) for k in self.metrics) if self.metrics else 0
        for k, v in self.metrics.items():
            lines.append(f"  {k:<{width}}  {_fmt(v)}")
        for name, groups in self.groups.items():
            if not groups:
                continue
            cols: List[str] = []
            for m in groups.values():
                for k in m:
                    if k not in cols:
                        cols.append(k)
            gw = max(len(name), *(len(g) for g in groups))
            cw = [max(len(c), 8) for c in cols]
            lines.append("")
            lines.append("  " + f"{name:<{gw}}" + "".join(f"  {c:>{w}}" for c, w in zip(cols, cw)))
            for g, m in groups.items():
                lines.append("  " + f"{g:<{gw}}" + "".join(f"  {_fmt(m.get(c)):>{w}}" for c, w in zip(cols, cw)))
        if self.notes:
            lines.append("")
            lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def pct(num: float, den: float) -> float:
    """num / den in percent; 0 when den is 0."""
    return 100.0 * num / den if den else 0.0


# --------------------------------------------------------------------------------------------
# Multiple choice: which option letter did the model answer?
# --------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?\s*([A-I])\b\)?", re.IGNORECASE)
_LEADING = re.compile(r"^\(?\s*([A-I])\s*(?:[.):：]|$)")
_OPTION_WORD = re.compile(r"(?:option|choice|选项|答案)\s*(?:是|为)?\s*[：:]?\s*\(?([A-I])\b", re.IGNORECASE)


def parse_option_letter(text: str, options: Optional[Dict[str, str]] = None,
                        letters: Optional[str] = None) -> Optional[str]:
    """The option letter a free-text answer picks, or None when it cannot be told.

    Accepted forms (in this order): a bare letter ("A", "A.", "(C)", "B)"), a leading letter
    followed by '.', ')' or ':' ("A. the cat"), "The answer is B" / "Answer: (B)", "option C",
    and finally a reply equal to one option's text ("the cat"). Letters outside the question's
    options are rejected. ``letters`` (e.g. "ABCD") restricts the valid letters when the option
    texts are not known.
    """
    valid = "".join(options) if options else (letters or "ABCDE")
    t = text.strip()
    if not t:
        return None
    candidates: List[Optional[str]] = []
    m = _LEADING.match(t)
    if m:
        candidates.append(m.group(1))
    else:
        m = _ANSWER_IS.search(t)
        if m and m.group(1).isupper():
            candidates.append(m.group(1))
        else:
            m = _OPTION_WORD.search(t)
            if m and m.group(1).isupper():
                candidates.append(m.group(1))
    for c in candidates:
        if c in valid:
            return c
        return None
    if options:
        norm = _norm_option(t)
        matches = [letter for letter, value in options.items() if _norm_option(value) == norm]
        if len(matches) == 1:
            return matches[0]
    return None


def _norm_option(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().rstrip(".。").strip().lower())


def group_metrics(records: Iterable[Tuple[Optional[str], bool]]) -> Dict[str, Dict[str, float]]:
    """(group, correct) pairs -> group -> {accuracy %, n}, groups sorted by name."""
    tally: Dict[str, List[int]] = {}
    for g, ok in records:
        if g is None:
            continue
        t = tally.setdefault(str(g), [0, 0])
        t[0] += int(ok)
        t[1] += 1
    return {g: {"accuracy": pct(c, n), "n": n} for g, (c, n) in sorted(tally.items())}
