"""Benchmark scorers on small hand-made fixtures. Every expected number is computed by hand in the
comment next to it; none comes from running the code."""
import base64
import io
import json
import os
import zipfile
from xml.etree import ElementTree

import pytest

from visualrwkv.errors import UserError
from visualrwkv.eval import score as score_cli
from visualrwkv.eval.metrics import (load_answers, normalize_gqa_answer, normalize_vqa_answer, parse_mme_answer,
                                     parse_option_letter, parse_pope_answer, pope_metrics, vqa_accuracy,
                                     vqav2_submission, vizwiz_submission)
from visualrwkv.eval.metrics.mmbench import score_mmbench
from visualrwkv.eval.questions import load_questions

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def fx(*parts):
    return os.path.join(FIX, *parts)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def run_score(capsys, *argv):
    assert score_cli.main(list(argv)) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# VQA accuracy
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [
    ("two", "2"),                  # number words -> digits
    ("a dog", "dog"),              # articles dropped
    ("The dog", "dog"),
    ("dont", "don't"),             # contraction table restores the apostrophe
    ("Yes", "yes"),                # lower-cased
    ("yes.", "yes"),               # trailing period removed
    ("10,000", "10000"),           # digit commas removed
    ("none", "0"),                 # the manual map also maps "none"
    ("black-and-white", "black and white"),  # '-' without spaces becomes a space
    ("what?", "what"),
])
def test_vqa_normalisation_makes_these_equal(a, b):
    assert normalize_vqa_answer(a) == normalize_vqa_answer(b)


@pytest.mark.parametrize("a,b", [
    ("2.5", "25"),   # a period before a digit is kept
    ("dog", "dogs"),
    ("yes", "no"),
])
def test_vqa_normalisation_keeps_these_apart(a, b):
    assert normalize_vqa_answer(a) != normalize_vqa_answer(b)


def test_vqa_normalisation_exact_outputs():
    assert normalize_vqa_answer("  The Dog. ") == "dog"
    assert normalize_vqa_answer("3.5") == "3.5"
    # "- " has a space next to it: deleted, not turned into a space.
    assert normalize_vqa_answer("red - white") == "red white"
    assert normalize_vqa_answer("Two dogs!") == "2 dogs"


@pytest.mark.parametrize("k,expected", [
    # k of 10 humans give the prediction. Leave human i out: if i is one of the k, k-1 match in
    # the remaining 9, else k. acc = mean_i min(matches_i / 3, 1):
    (0, 0.0),                                   # 0
    (1, 0.3),                                   # (1*0 + 9*1/3) / 10 = 3/10
    (2, 0.6),                                   # (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),                                   # (3*2/3 + 7*1) / 10 = (2 + 7) / 10
    (4, 1.0),                                   # (4*1 + 6*1) / 10  (3 of the other 9 still match)
    (10, 1.0),
])
def test_vqa_leave_one_out_accuracy(k, expected):
    humans = ["dog"] * k + ["cat"] * (10 - k)
    assert vqa_accuracy("dog", humans) == pytest.approx(expected)


def test_vqa_single_reference_is_exact_match():
    assert vqa_accuracy("A dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqav2_fixture_score(capsys, tmp_path):
    # Per question (humans -> prediction -> accuracy):
    # 1 number  10x"2"                 "two"   -> "2" matches 10 -> 1
    # 2 other   10x"dog"               "a dog" -> "dog"          -> 1
    # 3 yes/no  10x"yes"               "Yes."  -> "yes"          -> 1
    # 4 other   2x"dog" 8x"cat"        "dog"                     -> 0.6
    # 5 other   3x"don't" 7x"no"       "dont"  -> "don't"        -> 0.9
    # 6 number  4x"10,000" 6x"many"    "10000" (humans -> 10000) -> 1
    # 7 yes/no  10x"no"                "yes"                     -> 0
    # overall = (1+1+1+0.6+0.9+1+0)/7 = 5.5/7 = 78.5714%
    # number = (1+1)/2 = 100%; other = (1+0.6+0.9)/3 = 83.333%; yes/no = (1+0)/2 = 50%
    out_json = tmp_path / "r.json"
    out = run_score(capsys, "--benchmark", "vqav2", "--answers", fx("vqa_answers.jsonl"),
                    "--annotations", fx("vqa_annotations.json"), "--question_file", fx("vqa_questions.jsonl"),
                    "--output", str(out_json))
    assert "accuracy" in out and "78.57" in out
    res = json.loads(out_json.read_text())
    assert res["headline"] == "accuracy"
    assert res["metrics"]["accuracy"] == pytest.approx(550 / 7)
    assert res["metrics"]["n"] == 7
    at = res["groups"]["answer_type"]
    assert at["number"]["accuracy"] == pytest.approx(100.0)
    assert at["other"]["accuracy"] == pytest.approx(250 / 3)
    assert at["yes/no"]["accuracy"] == pytest.approx(50.0)
    assert res["model_id"] == "tiny"


def test_textvqa_llava_layout_matches_by_image_id_and_question(capsys, tmp_path):
    # LLaVA's TextVQA answers carry the image id as question_id; the question text (first prompt
    # line) tells the two questions of the image apart.
    # q1: 10x"dakota", pred "Dakota" -> 1;  q2: 8x"copenhagen" 2x"thursday", pred "Thursday." -> 0.6
    # accuracy = (1 + 0.6) / 2 = 80%
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 10},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "what does the small white text spell?",
         "answers": ["copenhagen"] * 8 + ["thursday"] * 2}]}))
    sfx = "\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "003a8ae2ef43b901",
         "prompt": "what does the small white text spell?\nReference OCR token: copenhagen, thursday" + sfx,
         "text": "Thursday.", "model_id": "m"},
        {"question_id": "003a8ae2ef43b901", "prompt": "what is the brand of this camera?\nReference OCR token: "
                                                      "dakota" + sfx, "text": "Dakota", "model_id": "m"}])
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "textvqa", "--answers", answers, "--annotations", str(ann),
              "--output", str(out_json))
    assert json.loads(out_json.read_text())["metrics"]["accuracy"] == pytest.approx(80.0)


def _vizwiz_files(tmp_path):
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps([
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 0,
         "answer_type": "unanswerable", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color?", "answerable": 1, "answer_type": "other",
         "answers": [{"answer": "blue", "answer_confidence": "yes"}] * 3
                    + [{"answer": "navy", "answer_confidence": "maybe"}] * 7}]))
    qfile = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 0, "image": "VizWiz_val_00000000.jpg", "text": "What is this?"},
        {"question_id": 1, "image": "VizWiz_val_00000001.jpg", "text": "What color?"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 0, "prompt": "p", "text": "Unanswerable", "model_id": "m"},
        {"question_id": 1, "prompt": "p", "text": "Blue.", "model_id": "m"}])
    return str(ann), qfile, answers


def test_vizwiz_val_matches_through_image_names(capsys, tmp_path):
    # q0: 10x"unanswerable", pred "Unanswerable" -> 1; q1: 3x"blue" 7x"navy", pred "Blue." -> 0.9
    # accuracy = 95%; per answer type: unanswerable 100, other 90
    ann, qfile, answers = _vizwiz_files(tmp_path)
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "vizwiz", "--answers", answers, "--annotations", ann, "--question_file", qfile,
              "--output", str(out_json))
    res = json.loads(out_json.read_text())
    assert res["metrics"]["accuracy"] == pytest.approx(95.0)
    assert res["groups"]["answer_type"]["other"]["accuracy"] == pytest.approx(90.0)
    # Without the question file the images of the answers are unknown.
    with pytest.raises(UserError, match="--question_file"):
        score_cli.main(["--benchmark", "vizwiz", "--answers", answers, "--annotations", ann])


# ------------------------------------------------------------------------------------------
# GQA
# ------------------------------------------------------------------------------------------

def test_gqa_fixture_score(capsys, tmp_path):
    # 201 gold "left"  pred "Left."     -> rstrip('.').lower() = "left"  right
    # 202 gold "yes"   pred "Yes"       -> "yes"                         right
    # 203 gold "table" pred "the table" -> wrong (exact); right once articles are dropped
    # 204 gold "white" pred "black"     -> wrong
    # accuracy = 2/4 = 50%; accuracy_normalised = 3/4 = 75%
    # structural: choose 1/1, verify 1/1, query 0/2; semantic: rel 1/1, attr 1/2, obj 0/1
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "gqa", "--answers", fx("gqa_answers.jsonl"),
              "--annotations", fx("gqa_testdev_balanced_questions.json"), "--output", str(out_json))
    res = json.loads(out_json.read_text())
    assert res["metrics"]["accuracy"] == pytest.approx(50.0)
    assert res["metrics"]["accuracy_normalised"] == pytest.approx(75.0)
    assert res["groups"]["structural"]["query"] == {"accuracy": 0.0, "n": 2}
    assert res["groups"]["semantic"]["attr"]["accuracy"] == pytest.approx(50.0)
    assert normalize_gqa_answer("Left.") == "left"


# ------------------------------------------------------------------------------------------
# ScienceQA
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("A", "A"), ("A.", "A"), ("(C)", "C"), ("C)", "C"), ("B. dog", "B"), ("The answer is B", "B"),
    ("The answer is D.", "D"), ("Answer: (C)", "C"), ("答案是B", "B"), (" b ", None),
    ("A dog", None),          # "A" is an article here, not a letter
    ("E", None),              # not one of the four options
    ("dog", "B"),             # the text of option B
    ("", None),
])
def test_parse_option_letter(text, expected):
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert parse_option_letter(text, options) == expected


def test_scienceqa_fixture_score(capsys, tmp_path):
    # id  gold (choices, answer idx)  image  reply                -> letter  right?
    # 10  A (cat/dog, 0)              yes    "A"                  -> A       yes
    # 11  C (red/green/blue, 2)       yes    "The answer is C."   -> C       yes
    # 12  B (1/2/3/4, 1)              no     "(B)"                -> B       yes
    # 13  B (x/y, 1)                  yes    "A."                 -> A       no
    # 14  A (up/down, 0)              no     "I am not sure"      -> none    no
    # accuracy = 3/5 = 60%; IMG (10, 11, 13) = 2/3 = 66.667%
    # subjects: natural 2/2, language 1/1, social 0/2
    out_json = tmp_path / "r.json"
    out = run_score(capsys, "--benchmark", "scienceqa", "--answers", fx("sqa_answers.jsonl"),
                    "--annotations", fx("sqa_problems.json"), "--output", str(out_json))
    res = json.loads(out_json.read_text())
    assert res["headline"] == "img_accuracy"
    assert res["metrics"]["img_accuracy"] == pytest.approx(200 / 3)
    assert res["metrics"]["accuracy"] == pytest.approx(60.0)
    assert res["metrics"]["n_img"] == 3
    assert res["groups"]["subject"]["social science"]["accuracy"] == 0.0
    assert "1 answers named no valid option letter" in out


def test_scienceqa_gold_from_llava_question_file(capsys, tmp_path):
    # Gold from the gpt turns: "10" -> "A" (image), "12" -> "The answer is B." -> B (no image).
    # Replies "A" (right) and "C" (wrong): accuracy 50%, IMG 1/1 = 100%.
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "10", "prompt": "p", "text": "A", "model_id": "m"},
                                                {"question_id": "12", "prompt": "p", "text": "C", "model_id": "m"}])
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "scienceqa", "--answers", answers, "--question_file", fx("sqa_questions.json"),
              "--output", str(out_json))
    res = json.loads(out_json.read_text())
    assert res["metrics"]["accuracy"] == pytest.approx(50.0)
    assert res["metrics"]["img_accuracy"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------
# POPE
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is not.", "no"),
    ("There is not a car.", "no"), ("Yes. No wait.", "yes"),   # only the first sentence counts
    ("Nope", "yes"),                                          # not one of the words No / no / not
    ("I don't know", "yes"),
])
def test_parse_pope_answer(text, expected):
    assert parse_pope_answer(text) == expected


def test_pope_metrics_by_hand():
    # preds yes yes yes no / labels yes no yes no: TP 2, FP 1, TN 1, FN 0
    # acc 3/4 = 75, precision 2/3, recall 1, F1 = 2*(2/3)/(5/3) = 0.8, yes-ratio 3/4
    m = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "no", "yes", "no"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (2, 1, 1, 0)
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(100.0)
    assert m["f1"] == pytest.approx(80.0)
    assert m["yes_ratio"] == pytest.approx(75.0)
    # Never saying yes: precision and F1 are 0, not a division by zero.
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0


def test_pope_fixture_score(capsys, tmp_path):
    # adversarial: 101 "Yes, there is a dog." -> yes, label yes: TP
    #              102 "No."                  -> no,  label no:  TN
    #              103 "There is not a car."  -> no,  label yes: FN
    #              104 "Yes"                  -> yes, label no:  FP
    #   TP1 FP1 TN1 FN1: acc 50, precision 50, recall 50, F1 50, yes-ratio 2/4 = 50
    # random:      201 "yes" TP, 202 "yes" FP, 203 "Yes. No wait." -> yes TP, 204 "no" TN
    #   TP2 FP1 TN1 FN0: acc 75, precision 66.667, recall 100, F1 80, yes-ratio 75
    # means: F1 65, acc 62.5, precision 58.333, recall 75, yes-ratio 62.5
    # (the coco_pope files number both splits 1..4 and the answers are shuffled: matching is
    # by split + image + question text, not by id or order)
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "pope", "--answers", fx("pope", "answers.jsonl"),
              "--annotations", fx("pope", "coco"), "--question_file", fx("pope", "llava_pope_test.jsonl"),
              "--output", str(out_json))
    res = json.loads(out_json.read_text())
    adv, rnd = res["groups"]["split"]["adversarial"], res["groups"]["split"]["random"]
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (1, 1, 1, 1)
    assert adv["f1"] == pytest.approx(50.0) and adv["yes_ratio"] == pytest.approx(50.0)
    assert (rnd["TP"], rnd["FP"], rnd["TN"], rnd["FN"]) == (2, 1, 1, 0)
    assert rnd["f1"] == pytest.approx(80.0) and rnd["yes_ratio"] == pytest.approx(75.0)
    m = res["metrics"]
    assert m["f1"] == pytest.approx(65.0)
    assert m["accuracy"] == pytest.approx(62.5)
    assert m["precision"] == pytest.approx(175 / 3)
    assert m["recall"] == pytest.approx(75.0)
    assert m["yes_ratio"] == pytest.approx(62.5)
    assert res["headline"] == "f1"


# ------------------------------------------------------------------------------------------
# MME
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("no", "no"), ("No, there is not", "no"), ("yes.", "yes"),
    ("I think yes", "other"),    # only the first four characters are looked at
    ("Not sure", "no"),          # "not " contains "no"
])
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def _mme_release(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    ex = root / "existence"                      # layout 1: images and .txt files side by side
    ex.mkdir(parents=True)
    (ex / "1.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                              "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (ex / "2.txt").write_text("Is there a car in this image? Please answer yes or no.\tYes\n"
                              "Is there a bus in this image? Please answer yes or no.\tNo\n")
    cr = root / "code_reasoning"                 # layout 2: images/ + questions_answers_YN/
    (cr / "images").mkdir(parents=True)
    (cr / "questions_answers_YN").mkdir()
    (cr / "questions_answers_YN" / "5.txt").write_text("Will the code print 3? Please answer yes or no.\tYes\n"
                                                        "Will the code print 4? Please answer yes or no.\tNo\n")
    return str(root)


def test_mme_scores_by_hand(capsys, tmp_path):
    # existence/1: dog "Yes" right, cat "No, there is not" -> no, right   -> image all right
    # existence/2: car "yes" right, bus "Yes" wrong (gt No)                -> image not all right
    #   acc 3/4 = 75, acc+ 1/2 = 50, score 125
    # code_reasoning/5: "I think yes" -> other (wrong), "no" right
    #   acc 1/2 = 50, acc+ 0/1 = 0, score 50
    # perception = 125 (existence is the only perception subtask answered), cognition = 50
    root = _mme_release(tmp_path)
    sfx = "\nAnswer the question using a single word or phrase."
    qs, ans = [], []
    items = [("existence", "1.png", "Is there a dog in this image? Please answer yes or no.", "Yes"),
             ("existence", "1.png", "Is there a cat in this image? Please answer yes or no.", "No, there is not"),
             ("existence", "2.png", "Is there a car in this image? Please answer yes or no.", "yes"),
             # a double space, as in some MME files, must still match
             ("existence", "2.png", "Is there a bus in this image?  Please answer yes or no.", "Yes"),
             ("code_reasoning", "5.png", "Will the code print 3? Please answer yes or no.", "I think yes"),
             ("code_reasoning", "5.png", "Will the code print 4? Please answer yes or no.", "no")]
    for i, (cat, img, q, reply) in enumerate(items):
        qs.append({"question_id": i, "image": f"{cat}/{img}", "text": q + sfx, "category": cat})
        ans.append({"question_id": i, "prompt": q + sfx, "text": reply, "model_id": "m"})
    qfile = write_jsonl(tmp_path / "llava_mme.jsonl", qs)
    afile = write_jsonl(tmp_path / "a.jsonl", ans)
    out_json = tmp_path / "r.json"
    out = run_score(capsys, "--benchmark", "mme", "--answers", afile, "--annotations", root, "--question_file", qfile,
                    "--output", str(out_json))
    res = json.loads(out_json.read_text())
    ex, cr = res["groups"]["subtask"]["existence"], res["groups"]["subtask"]["code_reasoning"]
    assert ex["accuracy"] == pytest.approx(75.0) and ex["accuracy_plus"] == pytest.approx(50.0)
    assert ex["score"] == pytest.approx(125.0)
    assert cr["accuracy"] == pytest.approx(50.0) and cr["accuracy_plus"] == 0.0 and cr["score"] == pytest.approx(50.0)
    assert res["metrics"]["perception"] == pytest.approx(125.0)
    assert res["metrics"]["cognition"] == pytest.approx(50.0)
    assert res["headline"] == "perception"
    assert "subtasks without answers" in out

    # Without a question file, LLaVA's ids ("<subtask>/<image>") and the answers' prompts are
    # enough to find the ground truth: same scores.
    from visualrwkv.eval.metrics.mme import load_mme_ground_truth, score_mme

    ans2 = [dict(a, question_id=f"{cat}/{img}") for a, (cat, img, _, _) in zip(ans, items)]
    res2 = score_mme(ans2, load_mme_ground_truth(root))
    assert res2.metrics["perception"] == pytest.approx(125.0) and res2.metrics["cognition"] == pytest.approx(50.0)

    # Through the command line with LLaVA's layout, where both questions of an image share the
    # id in the question file and in the answer file: still the same scores.
    qfile2 = write_jsonl(tmp_path / "llava_mme2.jsonl", [dict(q, question_id=q["image"]) for q in qs])
    afile2 = write_jsonl(tmp_path / "a2.jsonl", [{k: v for k, v in a.items()} for a in ans2])
    out_json2 = tmp_path / "r2.json"
    run_score(capsys, "--benchmark", "mme", "--answers", afile2, "--annotations", root, "--question_file", qfile2,
              "--output", str(out_json2))
    res3 = json.loads(out_json2.read_text())
    assert res3["metrics"]["perception"] == pytest.approx(125.0) and res3["metrics"]["cognition"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------
# MMBench circular evaluation
# ------------------------------------------------------------------------------------------

def _png_b64():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(tmp_path, with_answer=True):
    img = _png_b64()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [
        # question 0: 3 options, alone in the file (rotations must be generated)
        ["0", "What color is the box?", "nan", "red", "blue", "green", "nan", "B", "color", img, "src",
         "perception", "nan", "dev"],
        # question 1 with its legacy circular rows (index + k*1e6, image = reference to row 1)
        ["1", "How many cups?", "Count carefully.", "1", "2", "3", "4", "D", "count", img, "src", "perception",
         "nan", "dev"],
        ["1000001", "How many cups?", "Count carefully.", "2", "3", "4", "1", "C", "count", "1", "src",
         "perception", "nan", "dev"],
        ["2000001", "How many cups?", "Count carefully.", "3", "4", "1", "2", "B", "count", "1", "src",
         "perception", "nan", "dev"],
        ["3000001", "How many cups?", "Count carefully.", "4", "1", "2", "3", "A", "count", "1", "src",
         "perception", "nan", "dev"],
    ]
    if not with_answer:
        i = header.index("answer")
        header.pop(i)
        for r in rows:
            r.pop(i)
    path = tmp_path / "mmbench_dev.tsv"
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n", encoding="utf-8")
    return str(path)


def test_mmbench_circular(capsys, tmp_path):
    # Question 0 (options red/blue/green, gold B=blue) -> generated rotations
    #   id 0:        A red,   B blue,  C green  gold B; reply "B"                -> right
    #   id 1000000:  A blue,  B green, C red    gold A; reply "A."               -> right
    #   id 2000000:  A green, B red,   C blue   gold C; reply "The answer is C"  -> right
    #   -> circular right
    # Question 1 (legacy rows): 1 "D" right, 1000001 "C" right, 2000001 "B" right, 3000001 "B" wrong (gold A)
    #   -> circular wrong
    # circular accuracy = 1/2 = 50%; vanilla (round 0 only: ids 0 and 1, both right) = 100%
    # category: color 100%, count 0%; l2-category perception 50%
    tsv = _mmbench_tsv(tmp_path)
    replies = {0: "B", 1000000: "A.", 2000000: "The answer is C", 1: "D", 1000001: "C", 2000001: "B", 3000001: "B"}
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": k, "prompt": "p", "text": v, "model_id": "m"}
                                               for k, v in replies.items()])
    out_json = tmp_path / "r.json"
    run_score(capsys, "--benchmark", "mmbench", "--answers", afile, "--question_file", tsv, "--output", str(out_json))
    res = json.loads(out_json.read_text())
    assert res["metrics"]["circular_accuracy"] == pytest.approx(50.0)
    assert res["metrics"]["vanilla_accuracy"] == pytest.approx(100.0)
    assert res["metrics"]["questions"] == 2 and res["metrics"]["answers"] == 7
    assert res["groups"]["category"]["color"]["accuracy"] == pytest.approx(100.0)
    assert res["groups"]["category"]["count"]["accuracy"] == 0.0
    assert res["groups"]["l2-category"]["perception"]["accuracy"] == pytest.approx(50.0)


def test_mmbench_llava_round_ids(tmp_path):
    # LLaVA --all-rounds: question 0 answered in rounds 0, 1, 2 under its own index.
    # round 0 gold B reply "B" right; round 1 (blue, green, red) gold A reply "A" right;
    # round 2 (green, red, blue) gold C, reply "A" wrong -> question 0 circular wrong.
    # Question 1 answered only in its original order "D" (right) -> circular right but incomplete.
    # circular = 1/2 = 50%; vanilla = 2/2 = 100%
    qs = load_questions(_mmbench_tsv(tmp_path), "mmbench")
    answers = [{"question_id": 0, "round_id": 0, "text": "B", "_line": 1},
               {"question_id": 0, "round_id": 1, "text": "A", "_line": 2},
               {"question_id": 0, "round_id": 2, "text": "A", "_line": 3},
               {"question_id": 1, "round_id": 0, "text": "D", "_line": 4}]
    res = score_mmbench(answers, qs)
    assert res.metrics["circular_accuracy"] == pytest.approx(50.0)
    assert res.metrics["vanilla_accuracy"] == pytest.approx(100.0)
    assert any("not asked in all their rotations" in n for n in res.notes)


def test_mmbench_missing_questions_are_an_error(tmp_path):
    qs = load_questions(_mmbench_tsv(tmp_path), "mmbench")
    answers = [{"question_id": 0, "text": "B", "_line": 1}]
    with pytest.raises(UserError, match="have no answer"):
        score_mmbench(answers, qs)
    # allowed: question 1 is left out, question 0 is right in its one asked rotation
    assert score_mmbench(answers, qs, allow_missing=True).metrics["circular_accuracy"] == pytest.approx(100.0)


def test_mmbench_test_split_without_answers_gives_submission(capsys, tmp_path):
    tsv = _mmbench_tsv(tmp_path, with_answer=False)
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": "p", "text": t, "model_id": "m"}
                                               for i, t in [(0, "B"), (1, "D"), (1000001, "C")]])
    sub_tsv = tmp_path / "upload" / "sub.tsv"
    out = run_score(capsys, "--benchmark", "mmbench", "--answers", afile, "--question_file", tsv,
                    "--submission", str(sub_tsv))
    assert "wrote 5 records" in out
    lines = sub_tsv.read_text(encoding="utf-8").splitlines()
    # hint / category / source / image / comment / l2-category dropped; prediction after the options
    assert lines[0].split("\t") == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    assert lines[1].split("\t") == ["0", "What color is the box?", "red", "blue", "green", "", "B", "dev"]
    assert lines[3].split("\t")[6] == "C"       # row 1000001
    assert lines[4].split("\t")[6] == ""        # row 2000001 was not answered

    sub_xlsx = tmp_path / "sub.xlsx"
    run_score(capsys, "--benchmark", "mmbench", "--answers", afile, "--question_file", tsv,
              "--submission", str(sub_xlsx))
    with zipfile.ZipFile(sub_xlsx) as z:
        assert "xl/workbook.xml" in z.namelist()
        for name in z.namelist():  # every part is well-formed XML
            ElementTree.fromstring(z.read(name))
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
    assert "<t xml:space=\"preserve\">prediction</t>" in sheet and "What color is the box?" in sheet
    # Scoring the test split is impossible without the answer column.
    with pytest.raises(UserError, match="nothing to score"):
        score_cli.main(["--benchmark", "mmbench", "--answers", afile, "--question_file", tsv])


# ------------------------------------------------------------------------------------------
# Submission files
# ------------------------------------------------------------------------------------------

def test_vqav2_submission_fills_unanswered(tmp_path):
    qs = load_questions(write_jsonl(tmp_path / "test2015.jsonl", [
        {"question_id": i, "image": f"{i}.jpg", "text": "q"} for i in (1, 2, 3)]), "vqav2")
    answers = [{"question_id": 1, "text": "Two", "_line": 1}, {"question_id": 2, "text": "A dog.", "_line": 2}]
    assert vqav2_submission(answers, qs) == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "dog"},
                                             {"question_id": 3, "answer": ""}]


def test_vqav2_submission_from_cli(capsys, tmp_path):
    out_file = tmp_path / "upload.json"
    out = run_score(capsys, "--benchmark", "vqav2", "--answers", fx("vqa_answers.jsonl"), "--question_file",
                    fx("vqa_questions.jsonl"), "--submission", str(out_file))
    assert "wrote 7 records" in out and "accuracy" not in out  # no annotations: submission only
    sub = json.loads(out_file.read_text())
    assert sub[0] == {"question_id": 1, "answer": "2"} and sub[4] == {"question_id": 5, "answer": "don't"}


def test_vizwiz_submission(tmp_path):
    _, qfile, answers = _vizwiz_files(tmp_path)
    qs = load_questions(qfile, "vizwiz")
    ans = load_answers(answers)
    assert vizwiz_submission(ans, qs) == [{"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
                                          {"image": "VizWiz_val_00000001.jpg", "answer": "blue"}]
    with pytest.raises(UserError, match="no answer"):
        vizwiz_submission(ans[:1], qs)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_bad_answer_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        load_answers(str(bad))
    bad.write_text('{"question_id": 1, "text": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: answer has no 'question_id'"):
        load_answers(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_answers(str(tmp_path / "nope.jsonl"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "b"}])
    with pytest.raises(UserError, match="second answer for question 1"):
        score_cli.main(["--benchmark", "vqav2", "--answers", dup, "--annotations", fx("vqa_annotations.json")])


def test_missing_answers_need_allow_missing(capsys, tmp_path):
    # The question file has 7 questions, the answer file only the first 3 (all right -> 100%).
    lines = open(fx("vqa_answers.jsonl")).read().splitlines()[:3]
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines) + "\n")
    argv = ["--benchmark", "vqav2", "--answers", str(part), "--annotations", fx("vqa_annotations.json"),
            "--question_file", fx("vqa_questions.jsonl")]
    with pytest.raises(UserError, match="4 of 7 questions have no answer"):
        score_cli.main(argv)
    out = run_score(capsys, *argv, "--allow_missing")
    assert "100.00" in out and "4 questions of the question file had no answer" in out


def test_wrong_annotation_format_and_unmatched(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"foo": 1}))
    with pytest.raises(UserError, match="expected a list of annotations"):
        score_cli.main(["--benchmark", "vqav2", "--answers", fx("vqa_answers.jsonl"), "--annotations", str(ann)])
    with pytest.raises(UserError, match="none of the 5 answers matched"):
        score_cli.main(["--benchmark", "vqav2", "--answers", fx("sqa_answers.jsonl"),
                        "--annotations", fx("vqa_annotations.json")])
    with pytest.raises(UserError, match="do not exist"):
        score_cli.main(["--benchmark", "gqa", "--answers", fx("gqa_answers.jsonl"),
                        "--annotations", str(tmp_path / "missing.json")])
    with pytest.raises(UserError, match="nothing to score against"):
        score_cli.main(["--benchmark", "gqa", "--answers", fx("gqa_answers.jsonl")])


def test_help_shows_an_example_command(capsys):
    with pytest.raises(SystemExit) as e:
        score_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "visualrwkv score --benchmark textvqa" in out and "--annotations" in out
