"""VQA accuracy (VQAv2, TextVQA, VizWiz) with the official answer normalisation.

The normalisation is the one of the VQA evaluation script as the EvalAI servers and LLaVA's
TextVQA evaluator apply it (lower-case; ',' '?' removed; "'s" split off; punctuation removed or
turned into spaces; periods not followed by a digit removed; number words "zero".."ten" (and
"none") -> digits; articles dropped; contraction table). It is applied to the prediction and to
every human answer.

Accuracy of one prediction against the n human answers (n = 10 in all three benchmarks): for each
of the n leave-one-out subsets of n-1 humans, min(#humans in the subset giving the prediction / 3,
1); the question's accuracy is the mean over the n subsets. With k of 10 humans matching this is
0, 0.3, 0.6, 0.9 for k = 0..3 and 1 for k >= 4. The benchmark accuracy is the mean over questions.

One difference from the original vqaEval.py: it normalises the prediction only when the human
answers disagree (assuming unanimous ground truth is already canonical, so a raw "Yes." scores 0
there); we normalise always, as the EvalAI answer processor that LLaVA runs before upload does.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import Score, read_json_file
from visualrwkv.eval.questions import Question, id_key, strip_suffixes

# --- the official normalisation tables ------------------------------------------------------

# Contractions written without their apostrophe -> the form the annotations use. The odd entry
# "somebody'd" -> "somebodyd" is in the official table and kept for identical scores.
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't |
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't |
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd |
hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's |
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've |
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've |
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't |
notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at |
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's |
shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've |
somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've |
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've |
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd |
somethingd've something'd've | something'dve something'd've | somethingll something'll |
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're |
theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll |
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've |
weve we've | werent weren't | whatll what'll | whatre what're | whats what's | whatve what've |
whens when's | whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've |
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're |
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've |
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've |
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've |
youll you'll | youre you're | youve you've
"""
CONTRACTIONS: Dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " ").split("|") if pair.strip())

# The "manual map" of the official script: number words -> digits ("none" counts as 0).
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Characters removed (or turned into spaces) by the punctuation step. '.' and "'" are not among
# them: periods have their own rule, apostrophes belong to contractions.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# A comma between two digits ("10,000").
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. (The official pattern is "(?!<=\d)(\.)(?!\d)"; its first
# group is a no-op lookahead, so a period after a digit is removed too: "5." -> "5", "2.5" stays.)
_PERIOD_STRIP = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    """Official rule: a punctuation mark next to a space (or anywhere, when the text has a
    digit-comma-digit) is deleted; otherwise it becomes a space ("black-and-white" -> "black and
    white"). Then periods not followed by a digit are deleted."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """Number words -> digits, articles dropped, contractions restored."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation (EvalAI answer processor)."""
    t = text.lower()
    # Tokenisation step of the processor: ',' and '?' go, "'s" is split off as its own word.
    t = t.replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    t = _process_punctuation(t)
    return _process_digit_article(t)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of one prediction: mean over the leave-one-out subsets of the human
    answers of min(#matches in the subset / 3, 1). With a single reference answer (custom data)
    the leave-one-out is impossible and the score is plain exact match after normalisation."""
    if not human_answers:
        raise ValueError("no reference answers")
    pred = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(pred == humans[0])
    matches = sum(h == pred for h in humans)
    total = 0.0
    for h in humans:  # leave human h out
        total += min(1.0, (matches - (h == pred)) / 3.0)
    return total / len(humans)


# --- annotations ------------------------------------------------------------------------------

def _answers_of(rec: Dict[str, Any], where: str) -> List[str]:
    raw = rec.get("answers")
    if raw is None and isinstance(rec.get("answer"), str):
        raw = [rec["answer"]]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: annotation has no 'answers' list")
    out = []
    for a in raw:
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):
            out.append(a)
        else:
            raise UserError(f"{where}: human answers must be strings or {{answer: ...}} objects, got {a!r}")
    return out


def load_vqa_annotations(path: str) -> List[Dict[str, Any]]:
    """Ground truth of VQAv2 (``{"annotations": [...]}``), TextVQA (``{"data": [...]}``), VizWiz
    (a list, keyed by ``image``) or a plain list / JSONL of ``{question_id, answers}``.

    Returns records with ``answers`` (list of str) and whatever of ``question_id``, ``image``,
    ``image_id``, ``question``, ``answer_type``, ``question_type`` the file has.
    """
    data = read_json_file(path, "annotation file")
    if isinstance(data, dict):
        for key in ("annotations", "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise UserError(f"{path}: expected a list of annotations, or an object with an 'annotations' "
                            f"(VQAv2) or 'data' (TextVQA) list")
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: no annotations found")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object")
        item = {"answers": _answers_of(rec, where)}
        for k in ("question_id", "image", "image_id", "question", "answer_type", "question_type"):
            if rec.get(k) is not None:
                item[k] = rec[k]
        if "question_id" not in item and "image" not in item:
            raise UserError(f"{where}: annotation has neither 'question_id' nor 'image'")
        out.append(item)
    return out


def prompt_question(prompt: str) -> str:
    """The question line of a TextVQA prompt (drops OCR-token lines and instruction lines)."""
    m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if prompt.startswith("OCR tokens: ") and m:
        return m.group(1).strip().lower()
    for line in strip_suffixes(prompt).split("\n"):
        line = line.strip()
        if line and not line.startswith("Reference OCR token"):
            return line.lower()
    return ""


class _VQAIndex:
    """Finds the annotation of an answer: by question id; by image file (VizWiz, through the
    question file); or by (image id, question text) as LLaVA's TextVQA evaluation does."""

    def __init__(self, annotations: Sequence[Dict[str, Any]]):
        self.by_qid: Dict[str, Dict[str, Any]] = {}
        self.by_image: Dict[str, Dict[str, Any]] = {}
        self.by_image_question: Dict[Tuple[str, str], Dict[str, Any]] = {}
        for rec in annotations:
            if "question_id" in rec:
                self.by_qid[id_key(rec["question_id"])] = rec
            elif "image" in rec:
                self.by_image[os.path.basename(str(rec["image"]))] = rec
            if "image_id" in rec and isinstance(rec.get("question"), str):
                self.by_image_question[(id_key(rec["image_id"]), rec["question"].strip().lower())] = rec

    def find(self, answer: Dict[str, Any], question: Optional[Question]) -> Optional[Dict[str, Any]]:
        key = id_key(answer["question_id"])
        if key in self.by_qid:
            return self.by_qid[key]
        if question is not None and isinstance(question.image, str):
            rec = self.by_image.get(os.path.basename(question.image))
            if rec is not None:
                return rec
        if self.by_image_question:
            # LLaVA's TextVQA files use the image id as question_id, so several answers share an
            # id and only the question text tells them apart: take it from the answer's prompt.
            text = answer.get("prompt") or (question.question if question is not None else "")
            return self.by_image_question.get((key, prompt_question(str(text))))
        return None


def score_vqa(benchmark: str, answers: Sequence[Dict[str, Any]], annotations: Sequence[Dict[str, Any]],
              questions: Optional[Dict[str, Question]] = None) -> Score:
    """VQA accuracy of an answer file against human annotations, overall and per answer type."""
    index = _VQAIndex(annotations)
    type_scores: Dict[str, List[float]] = {}
    scores: List[float] = []
    unmatched = []
    if not index.by_qid and index.by_image and questions is None:
        raise UserError("these annotations are keyed by image file (VizWiz); pass --question_file so that "
                        "answers can be matched to their images")
    for a in answers:
        q = questions.get(id_key(a["question_id"])) if questions else None
        gold = index.find(a, q)
        if gold is None:
            unmatched.append(a["question_id"])
            continue
        s = vqa_accuracy(a["text"], gold["answers"])
        scores.append(s)
        if gold.get("answer_type") is not None:
            type_scores.setdefault(str(gold["answer_type"]), []).append(s)
    if not scores:
        raise UserError(f"none of the {len(answers)} answers matched an annotation (ids such as "
                        f"{answers[0]['question_id']!r}); check --annotations and --question_file")
    metrics: Dict[str, float] = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(scores)}
    groups = {}
    if type_scores:
        groups["answer_type"] = {t: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)}
                                 for t, v in sorted(type_scores.items())}
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} answers had no annotation and were left out (e.g. {unmatched[0]!r})")
    return Score(benchmark=benchmark, headline="accuracy", metrics=metrics, groups=groups, notes=notes)


__all__ = ["normalize_vqa_answer", "vqa_accuracy", "load_vqa_annotations", "score_vqa", "CONTRACTIONS",
           "NUMBER_MAP"]
