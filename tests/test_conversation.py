"""Conversation format, ids and labels, worked by hand from SPEC §5/§6.

Expected ids are built from the strings the SPEC prescribes, encoded with the reference
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` (vocab file shipped inside the ``rwkv`` package), never
with the code under test.
"""
import json
import os

import pytest

from visualrwkv.constants import IGNORE_INDEX as X  # -100: no loss here
from visualrwkv.constants import IMAGE_TOKEN_INDEX as IMG  # -200
from visualrwkv.data.conversation import (
    RecordError,
    build_inference_ids,
    collapse,
    prepare_turns,
    question_ids,
    tokenize_record,
    tokenize_turns,
)
from visualrwkv.errors import UserError
from visualrwkv.tokenizer import get_tokenizer

DATA = "/work/shared/data/llava_sample/dummy.json"
ASSISTANT = [5585, 41693, 59]  # "Assistant:" (SPEC §3)
USER = [24281, 59]  # "User:"
NN = 261  # "\n\n"
SHORT = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def ref():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def human(ref, *pieces):
    """ids of a human turn given as text pieces and IMG markers; all masked."""
    ids = []
    for p in pieces:
        ids += [p] if p == IMG else ref.encode(p)
    return ids, [X] * len(ids)


def gpt(ref, text):
    """ids of a gpt turn 'Assistant: text\\n\\n'; the first 3 tokens (Assistant:) masked."""
    ids = ref.encode("Assistant: " + text + "\n\n")
    return ids, [X] * 3 + ids[3:]


def join(*turns):
    ids, labels = [], []
    for i, l in turns:
        ids += i
        labels += l
    return ids, labels


def test_reference_ids_from_spec(ref, tok):
    assert ref.encode("\n\n") == [NN] and tok.encode("\n\n") == [NN]
    assert ref.encode("User:") == USER and tok.encode("User:") == USER
    assert ref.encode("Assistant:") == ASSISTANT and tok.encode("Assistant:") == ASSISTANT
    # The answer's leading space is not part of the 3 masked tokens.
    assert tok.encode("Assistant: Yes")[:3] == ASSISTANT


@pytest.mark.parametrize("text, expected", [
    ("a\n\nb", "a\nb"),
    ("a\n \n\t\n\nb", "a\nb"),
    ("a\n\n\n\n\nb\n\nc", "a\nb\nc"),
    ("a\r\n\r\nb", "a\r\nb"),  # \r before the first \n is not part of the run
    ("a \n b", "a \n b"),  # one newline: untouched
    ("a\n  b", "a\n  b"),
])
def test_collapse(text, expected):
    assert collapse(text) == expected


def test_image_first(ref, tok):
    rec = {"id": "f1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "  <image>\nWhat is   this?\n\n\n  \nReally?  "},
        {"from": "gpt", "value": " A cat.\n\n\nSure. "}]}
    assert prepare_turns(rec, "first") == [("human", "<image>\nWhat is   this?\nReally?"), ("gpt", "A cat.\nSure.")]
    expected = join(human(ref, "User: ", IMG, "\nWhat is   this?\nReally?\n\n"), gpt(ref, "A cat.\nSure."))
    assert tokenize_record(rec, tok, "first") == expected
    ids, labels = expected
    assert ids[:4] == [24281, 59, 33, IMG]  # "User", ":", " ", image


def test_image_middle_several_human_turns(ref, tok):
    rec = {"id": "m1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "What is this?\n<image>\n\n" + SHORT},
        {"from": "gpt", "value": "Cat"},
        {"from": "human", "value": "  And the\n\n colour?  "},
        {"from": "gpt", "value": "Black"}]}
    # H: the image turn without <image> and without the short-answer sentence, stripped and
    # collapsed; the other human turn only stripped (its blank line stays in H).
    H = "What is this?\nAnd the\n\n colour?"
    image_turn = H + "\n<image>\nWhat is this?\n" + SHORT
    assert prepare_turns(rec, "middle") == [
        ("human", image_turn), ("gpt", "Cat"), ("human", "And the\n colour?"), ("gpt", "Black")]
    expected = join(
        human(ref, "User: " + H + "\n", IMG, "\nWhat is this?\n" + SHORT + "\n\n"),
        gpt(ref, "Cat"),
        human(ref, "User: And the\n colour?\n\n"),
        gpt(ref, "Black"))
    assert tokenize_record(rec, tok, "middle") == expected
    ids, labels = expected
    # Exactly the two answers (and their "\n\n") are trained.
    trained = [i for i, l in zip(ids, labels) if l != X]
    assert tok.decode(trained) == " Cat\n\n Black\n\n"


def test_image_middle_single_turn_llava(ref, tok):
    rec = {"id": "m2", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs it red?\n" + SHORT},
        {"from": "gpt", "value": "No"}]}
    text = "Is it red?\n<image>\nIs it red?\n" + SHORT
    assert prepare_turns(rec, "middle")[0] == ("human", text)
    expected = join(human(ref, "User: Is it red?\n", IMG, "\nIs it red?\n" + SHORT + "\n\n"), gpt(ref, "No"))
    assert tokenize_record(rec, tok, "middle") == expected


def test_image_last(ref, tok):
    rec = {"id": "l1", "image": "x.jpg", "conversations": [
        {"from": "Human", "value": "Describe\n\n\nit.\n<image>"},
        {"from": "GPT", "value": "A dog."}]}
    assert prepare_turns(rec, "last") == [("human", "Describe\nit.\n<image>"), ("gpt", "A dog.")]
    expected = join(human(ref, "User: Describe\nit.\n", IMG, "\n\n"), gpt(ref, "A dog."))
    assert tokenize_record(rec, tok, "last") == expected
    ids, _ = expected
    assert ids[ids.index(IMG) + 1:ids.index(IMG) + 5] == [NN] + ASSISTANT


def test_text_only_record(ref, tok):
    rec = {"id": "t1", "conversations": [
        {"from": "human", "value": "  Hi\n\n\nthere  "},
        {"from": "gpt", "value": "Hello!\n \nBye"},
        {"from": "human", "value": "A literal <image> stays text"},
        {"from": "gpt", "value": "ok"}]}
    for pos in ("first", "middle", "last"):  # the position only matters with an image
        assert prepare_turns(rec, pos) == [("human", "Hi\nthere"), ("gpt", "Hello!\nBye"),
                                           ("human", "A literal <image> stays text"), ("gpt", "ok")]
        expected = join(human(ref, "User: Hi\nthere\n\n"), gpt(ref, "Hello!\nBye"),
                        human(ref, "User: A literal <image> stays text\n\n"), gpt(ref, "ok"))
        ids, labels = tokenize_record(rec, tok, pos)
        assert (ids, labels) == expected
        assert IMG not in ids


def test_assistant_prefix_mask(tok):
    ids, labels = tokenize_turns([("human", "Q"), ("gpt", "Yes"), ("human", "Q2"), ("gpt", "No")], tok)
    starts = [k for k in range(len(ids) - 2) if ids[k:k + 3] == ASSISTANT]
    assert len(starts) == 2
    for s in starts:
        assert labels[s:s + 3] == [X, X, X]  # Assistant: never trained
        assert labels[s + 3] == ids[s + 3] != X  # the answer's first token is
    # Everything before the first answer is masked.
    assert all(l == X for l in labels[:starts[0] + 3])


def test_empty_assistant_turn(tok):
    ids, labels = tokenize_turns([("human", "Hi"), ("gpt", "")], tok)
    assert ids == tok.encode("User: Hi\n\n") + ASSISTANT  # no space, no "\n\n"
    assert labels == [X] * len(ids)
    # A value that is only whitespace becomes empty after stripping.
    rec = {"id": "e", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  \n "}]}
    assert tokenize_record(rec, tok)[0] == ids


@pytest.mark.parametrize("pos, pieces", [
    ("first", ["User: ", IMG, "\nWhat is it?\n\n"]),
    ("middle", ["User: What is it?\n", IMG, "\nWhat is it?\n\n"]),
    ("last", ["User: What is it?\n", IMG, "\n\n"]),
])
def test_question_ids(ref, tok, pos, pieces):
    expected = human(ref, *pieces)[0] + ASSISTANT
    assert question_ids("What is it?", tok, pos) == expected
    assert build_inference_ids([{"from": "human", "value": "<image>\nWhat is it?"}], tok, pos) == expected
    # An explicit open assistant turn gives the same prompt.
    assert build_inference_ids([("human", "<image>\nWhat is it?"), ("gpt", "")], tok, pos) == expected


def test_question_ids_without_image(ref, tok):
    assert question_ids("Hi\n\n\nthere", tok, has_image=False) == ref.encode("User: Hi\nthere\n\n") + ASSISTANT


def test_multi_turn_inference_prompt(ref, tok):
    conv = [("human", "<image>\nWhat is it?"), ("gpt", "A cat."), ("human", "Colour?")]
    H = "What is it?\nColour?"
    expected = (human(ref, "User: " + H + "\n", IMG, "\nWhat is it?\n\n")[0]
                + ref.encode("Assistant: A cat.\n\n") + ref.encode("User: Colour?\n\n") + ASSISTANT)
    assert build_inference_ids(conv, tok, "middle") == expected
    # Training and inference share the format: the prompt is the training ids of the same turns.
    rec = {"id": "c", "image": "x", "conversations": [{"from": r, "value": v} for r, v in conv]}
    assert build_inference_ids(conv, tok, "middle") == tokenize_record(rec, tok, "middle")[0] + ASSISTANT


def test_real_record_golden(ref, tok):
    """A real LLaVA record (TextVQA caption) with literal ids for image position first."""
    rec = json.load(open(DATA))[1]
    ids, labels = tokenize_record(rec, tok, "first")
    head = [24281, 59, 33, IMG, 11, 48666, 332, 22226, 46, 54341]  # "User: <image>\nProvide a one-sentence..."
    tail = ASSISTANT + [20996, 32251, 4600, 22190, 3483, 59, 642, 59067, 4811, 32234, 38057, 47, NN]
    assert ids[:10] == head and ids[-16:] == tail
    assert labels == [X] * (len(ids) - 13) + tail[3:]
    assert tok.decode(tail[3:]) == " The time is now 10:22 according to this clock.\n\n"


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_all_sample_records_against_reference(ref, tok, pos):
    """Every record of the sample: ids = reference encoding of each turn string, split on <image>."""
    for rec in json.load(open(DATA)):
        turns = prepare_turns(rec, pos)
        exp_ids, exp_labels = [], []
        for role, text in turns:
            s = ("User: " if role == "human" else "Assistant: ") + text + "\n\n"
            pieces = s.split("<image>")
            ids = ref.encode(pieces[0]) + [IMG] + ref.encode(pieces[1]) if len(pieces) == 2 else ref.encode(s)
            exp_ids += ids
            exp_labels += [X] * len(ids) if role == "human" else [X] * 3 + ids[3:]
        assert tokenize_record(rec, tok, pos) == (exp_ids, exp_labels), rec["id"]
        assert exp_ids.count(IMG) == 1


def test_unknown_role_names_record():
    rec = {"id": "rec-42", "conversations": [{"from": "system", "value": "x"}]}
    with pytest.raises(RecordError, match="rec-42") as e:
        prepare_turns(rec, "first")
    assert e.value.kind == "unknown_role" and "system" in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("rec, kind", [
    ({"id": "a", "image": "x", "conversations": [{"from": "human", "value": "<image> <image>"}]}, "multiple_images"),
    ({"id": "a", "image": "x", "conversations": [{"from": "human", "value": "<image>"},
                                                 {"from": "gpt", "value": "<image>"}]}, "multiple_images"),
    ({"id": "a", "image": "x", "conversations": [{"from": "human", "value": "no image here"}]},
     "image_without_placeholder"),
    ({"id": "a"}, "malformed"),
    ({"id": "a", "conversations": "hi"}, "malformed"),
    ({"id": "a", "conversations": []}, "malformed"),
    ({"id": "a", "conversations": [{"from": "human"}]}, "malformed"),
    ({"id": "a", "conversations": [{"value": "x"}]}, "malformed"),
    ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, "malformed"),
    ({"id": "a", "image": ["x", "y"], "conversations": [{"from": "human", "value": "<image>"}]}, "malformed"),
])
def test_bad_records(rec, kind, tok):
    with pytest.raises(RecordError) as e:
        tokenize_record(rec, tok, "middle")
    assert e.value.kind == kind and e.value.record_id == "a"


def test_bad_image_position(tok):
    with pytest.raises(UserError, match="image_position"):
        question_ids("q", tok, "center")
