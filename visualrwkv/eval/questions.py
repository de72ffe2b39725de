"""Benchmark question files in the LLaVA evaluation layouts (SPEC §8).

Three layouts are read:

* ``.jsonl`` -- one JSON object per line, as LLaVA's ``model_vqa_loader`` reads them
  (``question_id``, ``image``, ``text`` and benchmark fields such as ``category`` for POPE / MME).
* ``.json``  -- a JSON list of records. Either the same fields as the jsonl layout, or LLaVA
  conversation records (``id``, ``image``, ``conversations``: the first human turn is the question,
  the following gpt turn, when present, the reference answer), as in ScienceQA's
  ``llava_test_CQM-A.json``. Records with a ``choices`` / ``options`` list are multiple choice.
* ``.tsv``   -- MMBench: ``index``, ``question``, ``hint``, option columns ``A``..``D`` (empty or
  ``nan`` when the question has fewer options), ``answer``, ``category``, ``l2-category`` and the
  image as base64 in ``image``. The legacy MMBench files also hold each question's circular
  variants as extra rows with ``index + k * 1_000_000``; those rows may carry, instead of the
  image, the index of the row that holds it.

Ids come from ``question_id``, ``id`` or ``index`` (first present). The prompt of each question
gets the benchmark's suffix the way LLaVA-1.5 asks it (``PROMPT_SUFFIXES``); a suffix that is
already in the text (LLaVA's own question files carry it) is not added twice. Prompts never hold
the ``<image>`` placeholder: the generation code puts the image where the conversation format
wants it.

Every malformed file or record raises ``UserError`` naming the file and line.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from visualrwkv.errors import UserError

BENCHMARKS = ("vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmbench", "mmbench_cn", "vizwiz",
              "custom")

# The instruction lines LLaVA-1.5 appends to the question (each on its own line).
SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
LETTER_EN = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"

PROMPT_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "vqav2": (SHORT_ANSWER,),
    "gqa": (SHORT_ANSWER,),
    "textvqa": (SHORT_ANSWER,),
    "vizwiz": (UNANSWERABLE, SHORT_ANSWER),
    "pope": (SHORT_ANSWER,),
    # MME questions end with "Please answer yes or no." already; LLaVA-1.5's llava_mme.jsonl adds
    # the short-answer line after it (its convert_answer_to_mme strips that line again).
    "mme": (SHORT_ANSWER,),
    "scienceqa": (LETTER_EN,),
    "mmbench": (LETTER_EN,),
    "mmbench_cn": (LETTER_CN,),
    "custom": (),
}

# Multiple-choice benchmarks: the prompt lists the options as "A. ..." lines.
CHOICE_BENCHMARKS = ("scienceqa", "mmbench", "mmbench_cn")
# Option letters a multiple-choice record may use (MMBench uses A-D, ScienceQA up to E).
OPTION_LETTERS = "ABCDEFGHI"
# Benchmarks whose LLaVA question files repeat ids: TextVQA uses the image id as question_id, MME
# "<subtask>/<image file>"; the two questions of an image share it and only their text differs.
IDS_MAY_REPEAT = ("textvqa", "mme")
# MMBench numbers the circular variants of question i as i + k * CIRCULAR_STRIDE.
CIRCULAR_STRIDE = 1_000_000

ImageSource = Union[str, "PIL.Image.Image", None]  # noqa: F821  (PIL is imported lazily)


@dataclass
class Question:
    """One benchmark question, ready to be asked and later scored.

    id        -- the question id as found in the file (int or str); answers carry it back.
    prompt    -- the text to ask: question (+ hint and options) + the benchmark's suffix.
    image     -- a path relative to the image folder, a decoded ``PIL.Image`` (MMBench base64),
                 or None for a text-only question.
    benchmark -- one of ``BENCHMARKS``.
    question  -- the question text as in the file, without added options or suffix.
    category  -- benchmark category when the file has one (POPE split, MME subtask, MMBench).
    options   -- multiple choice: letter -> option text, in letter order; empty otherwise.
    answer    -- the reference answer when the file has one (an option letter for multiple
                 choice, "yes"/"no" for POPE/MME labels, a string otherwise).
    hint      -- MMBench / ScienceQA context, when present.
    round_id  -- circular evaluation: 0 for the original option order, k for the k-th rotation.
    line      -- line of the source file the record starts on (for messages).
    meta      -- every other field of the record (kept for scoring and submission files).
    """

    id: Union[int, str]
    prompt: str
    image: ImageSource = None
    benchmark: str = "custom"
    question: str = ""
    category: Optional[str] = None
    options: Dict[str, str] = field(default_factory=dict)
    answer: Optional[str] = None
    hint: Optional[str] = None
    round_id: int = 0
    line: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def main_index(self) -> Union[int, str]:
        """The id shared by all circular variants of an MMBench question (``index % 1e6``)."""
        if "circular_of" in self.meta:  # a variant made by rotate_question
            return self.meta["circular_of"]
        if isinstance(self.id, int):
            return self.id % CIRCULAR_STRIDE
        return self.id

    def load_image(self, image_folder: Optional[str] = None):
        """The image as an RGB ``PIL.Image`` (None for a text-only question)."""
        from PIL import Image

        if self.image is None:
            return None
        if isinstance(self.image, str):
            path = self.image if image_folder is None else os.path.join(image_folder, self.image)
            if not os.path.isfile(path):
                raise UserError(f"question {self.id!r}: image {path!r} does not exist"
                                + ("" if image_folder else " (pass the image folder)"))
            try:
                with Image.open(path) as im:
                    return im.convert("RGB")
            except OSError as e:
                raise UserError(f"question {self.id!r}: cannot read image {path!r}: {e}") from None
        return self.image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------

def _check_benchmark(benchmark: str) -> str:
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    return benchmark


def apply_suffix(text: str, benchmark: str) -> str:
    """Append the benchmark's instruction lines to ``text``, skipping lines already present."""
    out = text.rstrip()
    for line in PROMPT_SUFFIXES[_check_benchmark(benchmark)]:
        if line not in out:
            out = out + "\n" + line if out else line
    return out


def strip_suffixes(text: str) -> str:
    """The question without any of the instruction lines LLaVA appends (for matching texts)."""
    out = text
    for line in (SHORT_ANSWER, UNANSWERABLE, LETTER_EN, LETTER_CN):
        out = out.replace(line, "")
    return out.strip()


def build_choice_prompt(question: str, options: Dict[str, str], hint: Optional[str], benchmark: str) -> str:
    """LLaVA-1.5's multiple-choice prompt: [hint\\n]question\\nA. ..\\nB. ..\\n<letter instruction>."""
    text = question if not hint else hint + "\n" + question
    for letter, option in options.items():
        text += "\n" + letter + ". " + option
    return apply_suffix(text, benchmark)


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------

def is_missing(value: Any) -> bool:
    """Empty cells of MMBench tsv files: None, NaN, '', 'nan', 'none' (case-insensitive)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "nan", "none"):
        return True
    return False


def _record_id(rec: Dict[str, Any], where: str) -> Union[int, str]:
    for key in ("question_id", "id", "index"):
        if key in rec and rec[key] is not None and rec[key] != "":
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, (int, str, float)):
                raise UserError(f"{where}: {key} must be a string or an integer, got {value!r}")
            if isinstance(value, float):
                if not value.is_integer():
                    raise UserError(f"{where}: {key} must be a string or an integer, got {value!r}")
                value = int(value)
            return value
    raise UserError(f"{where}: record has no question_id, id or index")


def _as_text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


_LINE_OPTION = re.compile(r"^\s*\(?([A-I])[.)]\s+(.*\S)\s*$")
_INLINE_OPTION = re.compile(r"\(([A-I])\)\s*(.*?)\s*(?=\([A-I]\)|$)")


def parse_options_from_text(text: str) -> Dict[str, str]:
    """Options written in a prompt: "A. foo" lines (LLaVA-1.5) or "Options: (A) foo (B) bar"."""
    found: Dict[str, str] = {}
    for line in text.split("\n"):
        m = _LINE_OPTION.match(line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2)
    if not found:
        for line in text.split("\n"):
            if line.strip().lower().startswith("options:"):
                for m in _INLINE_OPTION.finditer(line.split(":", 1)[1]):
                    found.setdefault(m.group(1), m.group(2))
    # Keep only a run that starts at A and has no gaps (a stray "C. Smith" line is not an option).
    options: Dict[str, str] = {}
    for letter in OPTION_LETTERS:
        if letter not in found:
            break
        options[letter] = found[letter]
    return options if len(options) >= 2 else {}


# --------------------------------------------------------------------------------------------
# Record -> Question
# --------------------------------------------------------------------------------------------

def _question_from_record(rec: Dict[str, Any], benchmark: str, where: str, line: int) -> Question:
    """A jsonl / json record (plain or with conversations) -> Question."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    qid = _record_id(rec, where)
    meta = {k: v for k, v in rec.items()}
    answer: Optional[str] = None

    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict) or "value" not in conv[0]:
            raise UserError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        raw = _as_text(conv[0]["value"], "conversations[0].value", where)
        raw = raw.replace("<image>", "").strip()
        if len(conv) > 1 and isinstance(conv[1], dict) and isinstance(conv[1].get("value"), str):
            meta["gpt_answer"] = conv[1]["value"]
    else:
        for key in ("text", "question", "prompt"):
            if key in rec:
                raw = _as_text(rec[key], key, where).replace("<image>", "").strip()
                break
        else:
            raise UserError(f"{where}: record has no question text ('text', 'question' or 'conversations')")

    hint = rec.get("hint")
    hint = None if is_missing(hint) else _as_text(hint, "hint", where)
    options: Dict[str, str] = {}
    choices = rec.get("choices", rec.get("options"))
    if isinstance(choices, list) and choices:
        # A structured multiple-choice record: build the LLaVA-1.5 prompt from its parts.
        if len(choices) > len(OPTION_LETTERS):
            raise UserError(f"{where}: {len(choices)} options; at most {len(OPTION_LETTERS)} are supported")
        options = {OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices)}
        prompt = build_choice_prompt(raw, options, hint, benchmark)
    else:
        if benchmark in CHOICE_BENCHMARKS:
            options = parse_options_from_text(raw)
        prompt = apply_suffix(raw, benchmark)

    # Reference answer, when the file carries one.
    for key in ("answer", "label", "gt_answer"):
        value = rec.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and options and 0 <= value < len(options):
            answer = OPTION_LETTERS[value]  # ScienceQA problems store the answer as an index
            break
        if isinstance(value, str) and value.strip():
            answer = value.strip()
            break

    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        raise UserError(f"{where}: field 'image' must be a path string, got {type(image).__name__}")
    category = rec.get("category")
    round_id = rec.get("round_id", 0) or 0
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise UserError(f"{where}: round_id must be a non-negative integer, got {round_id!r}")
    return Question(id=qid, prompt=prompt, image=image or None, benchmark=benchmark, question=raw,
                    category=None if category is None else str(category), options=options, answer=answer,
                    hint=hint, round_id=round_id, line=line, meta=meta)


def _iter_jsonl(path: str) -> Iterator[Tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line of a JSONL file."""
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def _iter_json_array(path: str, text: str) -> Iterator[Tuple[int, Any]]:
    """(line number, element) for each element of the top-level JSON array in ``text``.

    The array is walked element by element (rather than ``json.loads`` of the whole file) so that
    a bad record can be reported with the line it starts on.
    """
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    line, counted = 1, 0  # line number of position `counted`

    def line_of(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = ws.match(text, 0).end()
    if pos < len(text) and text[pos] == "\ufeff":
        pos = ws.match(text, pos + 1).end()
    if pos >= len(text) or text[pos] != "[":
        raise UserError(f"{path}:{line_of(pos)}: expected a JSON list of question records")
    pos = ws.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        yield line_of(start), obj
        pos = ws.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            if ws.match(text, pos + 1).end() != len(text):
                raise UserError(f"{path}:{line_of(pos)}: unexpected text after the JSON list")
            return
        raise UserError(f"{path}:{line_of(min(pos, len(text)))}: expected ',' or ']' in the JSON list")


def _load_jsonl(path: str, benchmark: str) -> List[Question]:
    return [_question_from_record(rec, benchmark, f"{path}:{lineno}", lineno) for lineno, rec in _iter_jsonl(path)]


def _load_json(path: str, benchmark: str) -> List[Question]:
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        # A dict wrapping the list ({"questions": [...]}, {"data": [...]}) is accepted too.
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        lists = [k for k in ("questions", "data") if isinstance(obj.get(k), list)]
        if not lists:
            raise UserError(f"{path}: expected a JSON list of question records (or an object with a "
                            f"'questions' / 'data' list)")
        records = obj[lists[0]]
        return [_question_from_record(rec, benchmark, f"{path}: {lists[0]}[{i}]", 0) for i, rec in enumerate(records)]
    return [_question_from_record(rec, benchmark, f"{path}:{lineno}", lineno)
            for lineno, rec in _iter_json_array(path, text)]


def _decode_base64_image(data: str, where: str):
    from PIL import Image

    try:
        raw = base64.b64decode(data.strip(), validate=False)
        image = Image.open(io.BytesIO(raw))
        image.format  # noqa: B018  (the header was parsed by open; the pixels load on demand)
        return image
    except (binascii.Error, ValueError, OSError) as e:
        raise UserError(f"{where}: the 'image' field is not a base64-encoded image ({e})") from None


def _int_or_str(value: str) -> Union[int, str]:
    v = value.strip()
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if re.fullmatch(r"-?\d+\.0+", v):
        return int(float(v))
    return v


def _load_tsv(path: str, benchmark: str) -> List[Question]:
    """MMBench-style tsv. Columns are found by name; option columns are single capital letters."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # base64 images are long fields
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{path}: the file is empty") from None
        except csv.Error as e:
            raise UserError(f"{path}:1: cannot parse the header ({e})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        if "question" not in header or not ({"index", "question_id", "id"} & set(header)):
            raise UserError(f"{path}:1: a question tsv needs an 'index' and a 'question' column; found {header}")
        letters = [c for c in OPTION_LETTERS if c in header]
        rows: List[Tuple[int, Dict[str, str]]] = []
        try:
            for row in reader:
                lineno = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UserError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
                rows.append((lineno, dict(zip(header, row))))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: cannot parse the row ({e})") from None

    # Circular-variant rows of the legacy files store the main row's index instead of the image.
    image_of_index = {r.get("index", "").strip(): r.get("image", "") for _, r in rows}

    questions: List[Question] = []
    for lineno, r in rows:
        where = f"{path}:{lineno}"
        rec: Dict[str, Any] = {k: v for k, v in r.items()}
        for key in ("index", "question_id", "id"):
            if key in rec and not is_missing(rec[key]):
                rec[key] = _int_or_str(rec[key])
        qid = _record_id(rec, where)
        options: Dict[str, str] = {}
        for letter in letters:  # LLaVA stops at the first empty option column
            if is_missing(r[letter]):
                break
            options[letter] = r[letter]
        if benchmark in CHOICE_BENCHMARKS and len(options) < 2:
            raise UserError(f"{where}: a multiple-choice question needs at least options A and B")
        hint = None if is_missing(r.get("hint")) else r["hint"]
        question = r["question"]
        if is_missing(question):
            raise UserError(f"{where}: empty question")
        answer = r.get("answer")
        answer = None if is_missing(answer) else answer.strip()
        if answer is not None and options and answer not in options:
            raise UserError(f"{where}: answer {answer!r} is not one of the options {', '.join(options)}")

        image = None
        data = r.get("image", "")
        if not is_missing(data):
            if len(data.strip()) <= 64:  # a reference to the row holding the image
                ref = image_of_index.get(data.strip())
                if ref is None or len(ref.strip()) <= 64:
                    raise UserError(f"{where}: image refers to index {data.strip()!r}, which has no image")
                data = ref
            image = _decode_base64_image(data, where)

        meta = {k: v for k, v in rec.items() if k != "image"}
        if benchmark in CHOICE_BENCHMARKS:
            prompt = build_choice_prompt(question, options, hint, benchmark)
        else:
            prompt = apply_suffix(question if not hint else hint + "\n" + question, benchmark)
        category = r.get("category")
        questions.append(Question(id=qid, prompt=prompt, image=image, benchmark=benchmark, question=question,
                                  category=None if is_missing(category) else category, options=options,
                                  answer=answer, hint=hint, line=lineno, meta=meta))
    # The variants of a legacy file: rotation number from the index itself.
    for q in questions:
        if isinstance(q.id, int) and q.id >= CIRCULAR_STRIDE:
            q.round_id = q.id // CIRCULAR_STRIDE
    return questions


def load_questions(path: str, benchmark: str = "custom") -> List[Question]:
    """Read a question file (.jsonl, .json or .tsv) into Questions with the benchmark's prompts.

    Raises UserError for a missing file, an unknown layout, a bad record (file:line in the
    message) or duplicate ids.
    """
    _check_benchmark(benchmark)
    if not os.path.isfile(path):
        raise UserError(f"question file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".jsonl":
            questions = _load_jsonl(path, benchmark)
        elif ext == ".json":
            questions = _load_json(path, benchmark)
        elif ext == ".tsv":
            questions = _load_tsv(path, benchmark)
        else:
            raise UserError(f"{path}: unknown question file type {ext!r}; expected .jsonl, .json or .tsv")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not questions:
        raise UserError(f"{path}: no questions in the file")
    seen: Dict[str, int] = {}
    for q in questions:
        key = id_key(q.id) + "#" + str(q.round_id)
        if benchmark in IDS_MAY_REPEAT:
            key += "#" + q.question
        if key in seen:
            raise UserError(f"{path}:{q.line}: duplicate question id {q.id!r} (first on line {seen[key]})")
        seen[key] = q.line
    return questions


def id_key(value: Any) -> str:
    """Ids compared as text, so 12, 12.0 and "12" from different files match."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# --------------------------------------------------------------------------------------------
# MMBench circular evaluation
# --------------------------------------------------------------------------------------------

def rotate_question(question: Question, k: int) -> Question:
    """The k-th circular variant: options shifted left by k (as LLaVA's --all-rounds does), the
    reference letter moved with its option, id ``index + k * 1e6`` when the index is an int."""
    letters = list(question.options)
    n = len(letters)
    if n < 2:
        raise UserError(f"question {question.id!r} has no options to rotate")
    k %= n
    values = [question.options[c] for c in letters]
    rotated = values[k:] + values[:k]
    options = dict(zip(letters, rotated))
    answer = question.answer
    if answer is not None and answer in question.options:
        old = letters.index(answer)
        answer = letters[(old - k) % n]  # value at old position now sits k places earlier
    main = question.main_index
    new_id = main + k * CIRCULAR_STRIDE if isinstance(main, int) else (main if k == 0 else f"{main}#{k}")
    meta = dict(question.meta)
    meta["circular_of"] = main
    return replace(question, id=new_id, options=options, answer=answer, round_id=k,
                   prompt=build_choice_prompt(question.question, options, question.hint, question.benchmark),
                   meta=meta)


def expand_circular(question: Question) -> List[Question]:
    """All circular variants of one multiple-choice question (the original first): one per option."""
    return [rotate_question(question, k) for k in range(len(question.options))]


def circular_questions(questions: Sequence[Question]) -> List[Question]:
    """The question list for MMBench circular evaluation.

    Questions whose main index (``index % 1e6``) already has several rows in the file (the legacy
    MMBench tsv holds the rotations) are kept as they are; a question alone in its group is
    expanded into its rotations with ``expand_circular``.
    """
    groups: Dict[str, List[Question]] = {}
    for q in questions:
        groups.setdefault(id_key(q.main_index), []).append(q)
    out: List[Question] = []
    for group in groups.values():
        if len(group) > 1:
            out.extend(group)
        else:
            out.extend(expand_circular(group[0]))
    return out
