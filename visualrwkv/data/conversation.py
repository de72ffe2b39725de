"""Conversation format, tokenization and labels (SPEC §5, §6).

One record of LLaVA data::

    {"id": "...", "image": "coco/train2017/000.jpg",          # "image" is optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

becomes, with image position ``first``::

    "User: <image>\\nWhat is this?\\n\\n" "Assistant: A cat.\\n\\n"

Each turn is tokenized on its own (the pieces around ``<image>`` are encoded separately and
joined with the placeholder id -200), the turns' ids are concatenated, and the labels are a copy
of the ids with -100 on every token of human turns and on the first 3 tokens of every gpt turn
(``Assistant:`` = 5585, 41693, 59).

The same code builds the prompt at inference (``build_inference_ids``), so training, evaluation,
chat, the demo and the server all see one format.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from visualrwkv.constants import (
    ASSISTANT_PREFIX_LEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from visualrwkv.errors import UserError

IMAGE_POSITIONS = ("first", "middle", "last")

# Removed from the human text that is repeated before the image in "middle" mode (the LLaVA
# short-answer instruction; the copy after the image keeps it).
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

# A newline, then any whitespace that contains at least one more newline: a run of blank lines.
_BLANK_LINES = re.compile(r"\n(\s*\n)+")

# Role names as written in the data (compared lower-cased) -> our role.
_ROLES = {"human": "human", "gpt": "gpt"}
_SPEAKER = {"human": "User", "gpt": "Assistant"}

Turn = Tuple[str, str]  # (role 'human' | 'gpt', processed text)


class RecordError(UserError):
    """A data record that cannot be used. ``kind`` is a short machine-readable reason
    (``malformed``, ``unknown_role``, ``multiple_images``, ``image_without_placeholder``,
    ``missing_image``, ``corrupt_image``); ``record_id`` names the record."""

    def __init__(self, record_id: str, kind: str, detail: str):
        self.record_id = record_id
        self.kind = kind
        self.detail = detail
        super().__init__(f"record {record_id}: {detail}")


def collapse(text: str) -> str:
    """Replace every run of blank lines (``\\n`` + whitespace with another ``\\n``) by one ``\\n``."""
    return _BLANK_LINES.sub("\n", text)


def record_id(record: Any, index: Optional[int] = None) -> str:
    """A printable name for a record: its ``id`` or, without one, its position in the file."""
    if isinstance(record, Mapping) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}" if index is not None else "<no id>"


def has_image(record: Mapping) -> bool:
    """Whether the record comes with an image (``"image"`` present and not null/empty)."""
    img = record.get("image")
    return img is not None and img != ""


def check_image_position(image_position: str) -> None:
    if image_position not in IMAGE_POSITIONS:
        raise UserError(f"--image_position must be one of {', '.join(IMAGE_POSITIONS)}; got {image_position!r}")


def _role(from_value: Any, rid: str) -> str:
    role = _ROLES.get(from_value.lower()) if isinstance(from_value, str) else None
    if role is None:
        raise RecordError(rid, "unknown_role", f"unknown speaker {from_value!r} in 'from' (must be 'human' or 'gpt')")
    return role


def validate_record(record: Any, index: Optional[int] = None) -> None:
    """Raise ``RecordError`` if the record cannot be turned into a training sample.

    Checks the structure (a dict with a non-empty ``conversations`` list of ``{"from", "value"}``
    dicts with string values), the roles, a string ``image`` path, and the number of ``<image>``
    placeholders: a record with an image needs exactly one (the model takes one image per
    sample). Images on disk are not looked at here.
    """
    rid = record_id(record, index)
    if not isinstance(record, Mapping):
        raise RecordError(rid, "malformed", f"a record must be a JSON object, got {type(record).__name__}")
    conv = record.get("conversations")
    if conv is None:
        raise RecordError(rid, "malformed", "no 'conversations' field")
    if not isinstance(conv, list):
        raise RecordError(rid, "malformed", f"'conversations' must be a list, got {type(conv).__name__}")
    if not conv:
        raise RecordError(rid, "malformed", "'conversations' is empty")
    for k, turn in enumerate(conv):
        if not isinstance(turn, Mapping):
            raise RecordError(rid, "malformed", f"turn {k} is not an object")
        for field in ("from", "value"):
            if field not in turn:
                raise RecordError(rid, "malformed", f"turn {k} has no '{field}' field")
        if not isinstance(turn["value"], str):
            raise RecordError(rid, "malformed", f"turn {k}: 'value' must be a string, got {type(turn['value']).__name__}")
        _role(turn["from"], rid)
    if "image" in record and record["image"] is not None and not isinstance(record["image"], str):
        raise RecordError(rid, "malformed",
                          f"'image' must be one path (a string), got {type(record['image']).__name__}; "
                          "several images per record are not supported")
    n_img = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conv)
    if has_image(record):
        if n_img > 1:
            raise RecordError(rid, "multiple_images",
                              f"{n_img} {DEFAULT_IMAGE_TOKEN} placeholders; a record takes exactly one image")
        if n_img == 0:
            raise RecordError(rid, "image_without_placeholder",
                              f"has an image but no {DEFAULT_IMAGE_TOKEN} placeholder in any turn")


def _human_text_for_middle(conv: Sequence[Mapping]) -> str:
    """``H`` of the sandwich layout: every human turn, joined by newlines. Turns with the image
    lose the placeholder and the short-answer instruction and have blank lines collapsed; other
    human turns are only stripped."""
    parts = []
    for turn in conv:
        if turn["from"].lower() != "human":
            continue
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            value = value.replace(SHORT_ANSWER_PROMPT, "").strip()
            parts.append(collapse(value))
        else:
            parts.append(value.strip())
    return "\n".join(parts)


def prepare_turns(record: Mapping, image_position: str = "middle") -> List[Turn]:
    """The record's turns as ``(role, text)`` with the text prepared as in SPEC §5.

    With an image, a turn that contains ``<image>`` loses it, is stripped and collapsed, and gets
    the image put back by ``image_position`` (``first``: before the text; ``middle``: after all
    human text ``H``, before the turn's text; ``last``: after the text); every other turn is
    stripped and collapsed. Without an image every turn is stripped and collapsed (a literal
    ``<image>`` stays text, as in the original).
    """
    check_image_position(image_position)
    validate_record(record)
    conv = record["conversations"]
    rid = record_id(record)
    with_image = has_image(record)
    human_text = _human_text_for_middle(conv) if with_image and image_position == "middle" else ""
    turns: List[Turn] = []
    for turn in conv:
        role = _role(turn["from"], rid)
        value = turn["value"]
        if with_image and DEFAULT_IMAGE_TOKEN in value:
            text = collapse(value.replace(DEFAULT_IMAGE_TOKEN, "").strip())
            if image_position == "first":
                text = DEFAULT_IMAGE_TOKEN + "\n" + text
            elif image_position == "middle":
                text = human_text + "\n" + DEFAULT_IMAGE_TOKEN + "\n" + text
            else:  # last
                text = text + "\n" + DEFAULT_IMAGE_TOKEN
            text = text.strip()
        else:
            text = collapse(value.strip())
        turns.append((role, text))
    return turns


def turn_string(role: str, text: str) -> str:
    """``"User: " + text + "\\n\\n"`` / ``"Assistant: " + text + "\\n\\n"``; an empty text (the open
    assistant turn at inference) becomes ``"Assistant:"`` with no space and no newlines."""
    speaker = _SPEAKER[role]
    return f"{speaker}: {text}\n\n" if text else f"{speaker}:"


def encode_with_image(text: str, tokenizer, split_image: bool = True) -> List[int]:
    """Encode ``text``; with ``split_image`` each ``<image>`` becomes the placeholder id -200 and
    the pieces around it are encoded separately (so no token spans the image)."""
    if not split_image:
        return tokenizer.encode(text)
    ids: List[int] = []
    for k, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(piece))
    return ids


def tokenize_turns(turns: Sequence[Turn], tokenizer, split_image: bool = True) -> Tuple[List[int], List[int]]:
    """Prepared turns -> ``(input_ids, labels)``, two lists of the same length T.

    ``labels`` is ``input_ids`` with -100 on every human-turn token and on the first 3 tokens of
    every gpt turn (``Assistant:``). ``split_image=False`` encodes ``<image>`` as plain text (the
    original does this for records without an image).
    """
    input_ids: List[int] = []
    labels: List[int] = []
    for role, text in turns:
        if role not in _SPEAKER:
            raise ValueError(f"role must be 'human' or 'gpt', got {role!r}")
        ids = encode_with_image(turn_string(role, text), tokenizer, split_image)
        input_ids.extend(ids)
        if role == "human":
            labels.extend([IGNORE_INDEX] * len(ids))
        else:
            n = min(ASSISTANT_PREFIX_LEN, len(ids))
            labels.extend([IGNORE_INDEX] * n + ids[n:])
    return input_ids, labels


def tokenize_record(record: Mapping, tokenizer, image_position: str = "middle") -> Tuple[List[int], List[int]]:
    """One LLaVA record -> ``(input_ids, labels)`` (lists; the image is one -200 placeholder)."""
    turns = prepare_turns(record, image_position)
    return tokenize_turns(turns, tokenizer, split_image=has_image(record))


ConversationLike = Sequence[Union[Mapping[str, Any], Tuple[str, str]]]


def _as_turn_dicts(conversation: ConversationLike) -> List[Dict[str, str]]:
    out = []
    for turn in conversation:
        if isinstance(turn, Mapping):
            out.append({"from": turn.get("from"), "value": turn.get("value")})
        else:
            role, value = turn
            out.append({"from": role, "value": value})
    return out


def build_inference_ids(conversation: ConversationLike, tokenizer, image_position: str = "middle",
                        has_image: Optional[bool] = None) -> List[int]:
    """The prompt ids for generation: the given turns prepared as in training, then the open
    assistant turn ``"Assistant:"`` (ids 5585, 41693, 59).

    ``conversation``: ``[{"from": "human"|"gpt", "value": ...}, ...]`` or ``[(role, text), ...]``,
    usually one human turn ``"<image>\\n" + question``; multi-turn chat passes the earlier turns
    too. A trailing empty gpt turn is taken as the open turn. ``has_image`` defaults to whether
    any turn contains ``<image>``.
    """
    turns = _as_turn_dicts(conversation)
    if turns and isinstance(turns[-1]["from"], str) and turns[-1]["from"].lower() == "gpt" and turns[-1]["value"] == "":
        turns = turns[:-1]
    if not turns:
        raise UserError("the conversation to answer is empty")
    if has_image is None:
        has_image = any(isinstance(t["value"], str) and DEFAULT_IMAGE_TOKEN in t["value"] for t in turns)
    record: Dict[str, Any] = {"id": "prompt", "conversations": turns}
    if has_image:
        record["image"] = "<inference image>"
    ids, _ = tokenize_record(record, tokenizer, image_position)
    return ids + tokenizer.encode(turn_string("gpt", ""))


def question_ids(question: str, tokenizer, image_position: str = "middle", has_image: bool = True) -> List[int]:
    """Prompt ids for one question: the human turn ``"<image>\\n" + question`` (or just the
    question without an image; a question that already holds ``<image>`` is used as is), then
    ``"Assistant:"``."""
    if has_image and DEFAULT_IMAGE_TOKEN not in question:
        question = DEFAULT_IMAGE_TOKEN + "\n" + question
    return build_inference_ids([{"from": "human", "value": question}], tokenizer, image_position, has_image)


def prompt_text(turns: Sequence[Turn], open_assistant: bool = False) -> str:
    """The text the model reads for these turns (``<image>`` marks the image)."""
    text = "".join(turn_string(role, value) for role, value in turns)
    return text + turn_string("gpt", "") if open_assistant else text
