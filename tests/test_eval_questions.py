"""Question files in the LLaVA evaluation layouts: jsonl, json (plain and conversation records),
MMBench tsv with base64 images; LLaVA-1.5 prompt suffixes; MMBench circular variants; errors."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from visualrwkv.errors import UserError
from visualrwkv.eval.questions import (LETTER_CN, LETTER_EN, SHORT_ANSWER, UNANSWERABLE, apply_suffix,
                                       circular_questions, expand_circular, load_questions)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def png_bytes(size=(4, 3), color=(0, 128, 255)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# jsonl
# ------------------------------------------------------------------------------------------

def test_jsonl_vqa_layout(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 7, "image": "COCO_1.jpg", "text": "What is it?", "category": "default"},
        # LLaVA's own files already carry the suffix: it must not be added twice
        {"question_id": 8, "image": "COCO_2.jpg", "text": "How many?\n" + SHORT_ANSWER},
    ])
    q1, q2 = load_questions(path, "vqav2")
    assert q1.id == 7 and q1.image == "COCO_1.jpg" and q1.category == "default"
    assert q1.prompt == "What is it?\n" + SHORT_ANSWER
    assert q1.question == "What is it?"
    assert q2.prompt == "How many?\n" + SHORT_ANSWER
    assert q1.meta["category"] == "default" and q1.line == 1 and q2.line == 2


@pytest.mark.parametrize("benchmark,expected", [
    ("vqav2", "Q?\n" + SHORT_ANSWER),
    ("gqa", "Q?\n" + SHORT_ANSWER),
    ("textvqa", "Q?\n" + SHORT_ANSWER),
    ("pope", "Q?\n" + SHORT_ANSWER),
    ("vizwiz", "Q?\n" + UNANSWERABLE + "\n" + SHORT_ANSWER),
    ("mme", "Q?\n" + SHORT_ANSWER),
    ("custom", "Q?"),
])
def test_prompt_suffixes(benchmark, expected):
    assert apply_suffix("Q?", benchmark) == expected
    assert apply_suffix(expected, benchmark) == expected  # idempotent


def test_jsonl_pope_and_mme_fields(tmp_path):
    path = write_jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "category": "adversarial",
         "label": "yes"}])
    (q,) = load_questions(path, "pope")
    assert q.category == "adversarial" and q.answer == "yes"
    path = write_jsonl(tmp_path / "mme.jsonl", [
        {"question_id": "existence/1.png", "image": "existence/1.png", "category": "existence",
         "text": "Is there a dog? Please answer yes or no."}])
    (q,) = load_questions(path, "mme")
    assert q.id == "existence/1.png"
    assert q.prompt == "Is there a dog? Please answer yes or no.\n" + SHORT_ANSWER


def test_ids_from_question_id_id_or_index(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "a", "id": "b", "text": "x"},
                                              {"id": "c", "index": 5, "text": "y"},
                                              {"index": 5.0, "text": "z"}])
    assert [q.id for q in load_questions(path)] == ["a", "c", 5]


def test_load_image_from_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (5, 6)).save(tmp_path / "imgs" / "x.png")
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "x.png", "text": "q"},
                                              {"question_id": 2, "image": "missing.png", "text": "q"},
                                              {"question_id": 3, "text": "text only"}])
    q1, q2, q3 = load_questions(path)
    im = q1.load_image(str(tmp_path / "imgs"))
    assert im.size == (5, 6) and im.mode == "RGB"
    with pytest.raises(UserError, match="missing.png"):
        q2.load_image(str(tmp_path / "imgs"))
    assert q3.image is None and q3.load_image(str(tmp_path)) is None


# ------------------------------------------------------------------------------------------
# json
# ------------------------------------------------------------------------------------------

def test_json_scienceqa_conversation_layout():
    q10, q12 = load_questions(os.path.join(FIX, "sqa_questions.json"), "scienceqa")
    assert q10.id == "10" and q10.image == "10/image.png"
    # <image> placeholder removed, the letter instruction appended (once: q12 already has it)
    assert q10.prompt == "Context: A picture.\nWhich animal is shown?\nA. cat\nB. dog\n" + LETTER_EN
    assert q12.prompt.endswith("D. 4\n" + LETTER_EN) and q12.prompt.count(LETTER_EN) == 1
    assert q10.options == {"A": "cat", "B": "dog"}
    assert q12.options == {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert q10.meta["gpt_answer"] == "A" and q12.meta["gpt_answer"] == "The answer is B."
    assert q12.image is None
    assert q10.line == 2 and q12.line == 16  # lines of the records' opening braces in the fixture


def test_json_structured_multiple_choice(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"id": "p1", "question": "Which is a mammal?", "hint": "Animals.",
                                 "choices": ["shark", "whale", "trout"], "answer": 1, "image": "p1.png"}]))
    (q,) = load_questions(str(path), "scienceqa")
    assert q.prompt == "Animals.\nWhich is a mammal?\nA. shark\nB. whale\nC. trout\n" + LETTER_EN
    assert q.answer == "B" and q.options["C"] == "trout"


def test_json_inline_options():
    from visualrwkv.eval.questions import parse_options_from_text

    assert parse_options_from_text("Question: q\nOptions: (A) red (B) blue green (C) 3") == {
        "A": "red", "B": "blue green", "C": "3"}
    assert parse_options_from_text("A. only one") == {}


def test_json_wrapped_list(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": [{"question_id": 1, "question": "q?", "image": "i.jpg"}]}))
    (q,) = load_questions(str(path), "gqa")
    assert q.prompt == "q?\n" + SHORT_ANSWER


# ------------------------------------------------------------------------------------------
# MMBench tsv
# ------------------------------------------------------------------------------------------

def _tsv(tmp_path, rows, header=None, name="mmb.tsv"):
    header = header or ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                        "l2-category"]
    path = tmp_path / name
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n", encoding="utf-8")
    return str(path)


def _rows():
    img = base64.b64encode(png_bytes()).decode()
    return [
        ["0", "What color?", "nan", "red", "blue", "green", "nan", "B", "color", img, "perception"],
        ["1", "How many cups?", "Count carefully.", "1", "2", "3", "4", "D", "count", img, "perception"],
        ["1000001", "How many cups?", "Count carefully.", "2", "3", "4", "1", "C", "count", "1", "perception"],
    ]


def test_tsv_with_base64_images(tmp_path):
    q0, q1, v1 = load_questions(_tsv(tmp_path, _rows()), "mmbench")
    assert q0.id == 0 and q1.id == 1 and v1.id == 1000001
    assert isinstance(q0.image, Image.Image) and q0.image.size == (4, 3)
    assert q0.load_image().getpixel((0, 0)) == (0, 128, 255)
    assert v1.image.size == (4, 3)  # the variant row refers to row 1's image
    assert q0.options == {"A": "red", "B": "blue", "C": "green"}  # stops at the empty D
    assert q0.hint is None and q0.answer == "B" and q0.category == "color"
    assert q0.prompt == "What color?\nA. red\nB. blue\nC. green\n" + LETTER_EN
    assert q1.prompt == "Count carefully.\nHow many cups?\nA. 1\nB. 2\nC. 3\nD. 4\n" + LETTER_EN
    assert q1.meta["l2-category"] == "perception" and "image" not in q1.meta
    assert (q0.round_id, v1.round_id) == (0, 1) and v1.main_index == 1


def test_tsv_mmbench_cn_suffix(tmp_path):
    rows = _rows()
    rows[0][1] = "盒子是什么颜色？"
    q0 = load_questions(_tsv(tmp_path, rows), "mmbench_cn")[0]
    assert q0.prompt == "盒子是什么颜色？\nA. red\nB. blue\nC. green\n" + LETTER_CN


def test_expand_circular(tmp_path):
    q1 = load_questions(_tsv(tmp_path, _rows()), "mmbench")[1]
    variants = expand_circular(q1)
    # options 1 2 3 4 with gold D (= "4"); rotation k shifts the options left by k:
    # k=1: 2 3 4 1 -> "4" at C; k=2: 3 4 1 2 -> B; k=3: 4 1 2 3 -> A
    assert [v.answer for v in variants] == ["D", "C", "B", "A"]
    assert [v.id for v in variants] == [1, 1000001, 2000001, 3000001]
    assert [v.round_id for v in variants] == [0, 1, 2, 3]
    assert variants[1].options == {"A": "2", "B": "3", "C": "4", "D": "1"}
    assert variants[1].prompt == "Count carefully.\nHow many cups?\nA. 2\nB. 3\nC. 4\nD. 1\n" + LETTER_EN
    assert all(v.image is q1.image for v in variants)


def test_circular_questions_keeps_legacy_rows_and_expands_single_ones(tmp_path):
    qs = load_questions(_tsv(tmp_path, _rows()), "mmbench")
    circ = circular_questions(qs)
    # question 0 (3 options, alone) -> 3 generated variants; question 1 already has 2 rows -> kept
    assert [q.id for q in circ] == [0, 1000000, 2000000, 1, 1000001]
    assert [q.answer for q in circ[:3]] == ["B", "A", "C"]  # blue moves B -> A -> C


# ------------------------------------------------------------------------------------------
# Errors name the file and line
# ------------------------------------------------------------------------------------------

def test_bad_jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    with pytest.raises(UserError, match=r"q.jsonl:2: invalid JSON"):
        load_questions(str(p))
    p.write_text('{"question_id": 1, "text": "a"}\n\n{"image": "x.jpg", "text": "b"}\n')
    with pytest.raises(UserError, match=r"q.jsonl:3: record has no question_id, id or index"):
        load_questions(str(p))
    p.write_text('{"question_id": 1, "image": "x.jpg"}\n')
    with pytest.raises(UserError, match=r"q.jsonl:1: record has no question text"):
        load_questions(str(p))
    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(UserError, match=r"q.jsonl:2: duplicate question id 1 \(first on line 1\)"):
        load_questions(str(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(UserError, match=r"q.jsonl:1: expected a JSON object"):
        load_questions(str(p))


def test_bad_json(tmp_path):
    p = tmp_path / "q.json"
    p.write_text('[\n  {"id": "1", "text": "a"},\n  {"id": "2",\n   "image": 5, "text": "b"}\n]\n')
    with pytest.raises(UserError, match=r"q.json:3: field 'image' must be a path string"):
        load_questions(str(p))
    p.write_text('[\n  {"id": "1", "text": "a"},\n  {"id": "2" "text": "b"}\n]\n')
    with pytest.raises(UserError, match=r"q.json:3: invalid JSON"):
        load_questions(str(p))
    p.write_text('{"foo": 1}')
    with pytest.raises(UserError, match="expected a JSON list"):
        load_questions(str(p))


def test_bad_tsv(tmp_path):
    rows = _rows()
    rows[1] = rows[1][:5]
    with pytest.raises(UserError, match=r"mmb.tsv:3: 5 columns, the header has 11"):
        load_questions(_tsv(tmp_path, rows), "mmbench")
    rows = _rows()
    rows[0][9] = "not base64 at all, definitely not an image" * 3
    with pytest.raises(UserError, match=r"mmb.tsv:2: the 'image' field is not a base64-encoded image"):
        load_questions(_tsv(tmp_path, rows), "mmbench")
    rows = _rows()
    rows[1][7] = "E"
    with pytest.raises(UserError, match=r"mmb.tsv:3: answer 'E' is not one of the options"):
        load_questions(_tsv(tmp_path, rows), "mmbench")
    with pytest.raises(UserError, match=r"needs an 'index' and a 'question' column"):
        load_questions(_tsv(tmp_path, [["1", "x"]], header=["foo", "bar"]), "mmbench")


def test_bad_paths_and_names(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_questions(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "q.csv"
    p.write_text("a,b\n")
    with pytest.raises(UserError, match="unknown question file type"):
        load_questions(str(p))
    with pytest.raises(UserError, match="unknown benchmark"):
        load_questions(os.path.join(FIX, "vqa_questions.jsonl"), "vqa3")
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(UserError, match="no questions"):
        load_questions(str(p))


def test_circular_variants_of_string_ids(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"id": "q-a", "question": "Pick", "choices": ["x", "y"], "answer": "B"}]))
    (q,) = load_questions(str(path), "mmbench")
    v0, v1 = expand_circular(q)
    assert (v0.id, v1.id) == ("q-a", "q-a#1")
    assert v1.main_index == "q-a" and v1.answer == "A" and v1.options == {"A": "y", "B": "x"}
