"""LLaVA-format data: loading, the training dataset, truncation and batching (SPEC §5, §9).

``LlavaDataset[i]`` gives one sample as it would be computed alone::

    {"id": str,
     "input_ids": LongTensor (T,)   # the image is ONE placeholder id -200
     "labels":    LongTensor (T,)   # -100 where no loss is taken
     "pixel_values": FloatTensor (3, H, W) or None for a text-only record}

and ``collate`` right-pads a list of them into a batch (no left padding, no fake images for
text-only samples: results never depend on what else is in the batch).

Length and truncation (SPEC §9). The length that counts against ``ctx_len`` is the length the
model sees, with the image expanded: ``len(input_ids) - 1 + n_image_tokens``. A longer sample
keeps its beginning and loses text from the end; the image is never cut. If even the part up to
the end of the image does not fit, the sample is dropped (``__getitem__`` returns None and
``collate`` leaves it out).

Counters, ``dataset.stats`` (each counts records, not reads, so a second epoch does not count
them twice; they are kept in shared memory, so reads done in DataLoader worker processes count):

- ``n_records``:   records given (before anything was skipped);
- ``n_truncated``: samples read so far that were longer than ``ctx_len`` and cut after the image;
- ``n_dropped``:   samples read so far whose text before the image plus the image alone exceed
  ``ctx_len`` (dropped, never cut into the image);
- ``n_skipped``:   bad records left out with ``on_bad_record='skip'``: rejected up front
  (malformed, unknown role, several ``<image>``, image file missing) or when read (image file
  unreadable or corrupt).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from visualrwkv.constants import EOT_ID, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.data.conversation import (
    RecordError,
    check_image_position,
    has_image,
    record_id,
    tokenize_record,
    validate_record,
)
from visualrwkv.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

_ID_IN_TEXT = re.compile(r'"id"\s*:\s*"([^"\\]*)"')


def _guess_id(line: str) -> Optional[str]:
    """The ``"id"`` of a line that is not valid JSON, if it can be read off the text."""
    m = _ID_IN_TEXT.search(line)
    return m.group(1) if m else None


def _first_line_is_json_object(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def read_records(path: PathLike) -> Tuple[List[Any], List[Tuple[int, str, Optional[str]]], List[int]]:
    """Read a LLaVA data file without stopping at bad lines.

    Returns ``(records, problems, line_numbers)``: the parsed records (anything JSON; records are
    validated elsewhere), a list of ``(line, message, guessed id)`` for lines that are not valid
    JSON, and the line on which each record starts (for messages). ``.jsonl`` files hold one
    record per line; other files a JSON list (a file that is not one JSON document but has a JSON
    object on each line is read as JSONL too). Raises ``UserError`` if the file cannot be read or
    is not valid JSON at all.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8") from None

    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if _first_line_is_json_object(text):
                data = None  # one JSON object per line: read it as JSONL below
            else:
                raise UserError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        if data is not None:
            if isinstance(data, dict) and "conversations" in data:
                data = [data]  # a single record
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
            # Line on which each record starts is unknown for a JSON list; 0 = not known.
            return data, [], [0] * len(data)

    records: List[Any] = []
    problems: List[Tuple[int, str, Optional[str]]] = []
    lines: List[int] = []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            lines.append(no)
        except json.JSONDecodeError as e:
            problems.append((no, f"invalid JSON ({e.msg}, column {e.colno})", _guess_id(line)))
    return records, problems, lines


def load_records(path: PathLike) -> List[Any]:
    """Records of a LLaVA JSON list or JSONL file; ``UserError`` naming the file and line for
    an unreadable file or an invalid JSON line."""
    records, problems, _ = read_records(path)
    if problems:
        line, msg, _ = problems[0]
        more = f" (and {len(problems) - 1} more bad lines; run 'visualrwkv data check')" if len(problems) > 1 else ""
        raise UserError(f"{os.fspath(path)}: line {line}: {msg}{more}")
    return records


def open_image(path: str):
    """Open and fully decode an image as RGB. Raises ``OSError`` / ``ValueError`` for a missing,
    unreadable or truncated file (truncated files are NOT padded, unlike the original)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode every byte now, so a truncated file fails here and not later
        return img.convert("RGB")


def expanded_length(input_ids: Sequence[int], n_image_tokens: int) -> int:
    """Length the model sees: the placeholder replaced by ``n_image_tokens`` image tokens."""
    n_img = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
    return len(input_ids) + n_img * (n_image_tokens - 1)


def fit_to_context(input_ids: List[int], labels: List[int], ctx_len: int,
                   n_image_tokens: int) -> Tuple[Optional[List[int]], Optional[List[int]], str]:
    """Apply the truncation policy. Returns ``(ids, labels, outcome)`` with outcome ``"ok"``,
    ``"truncated"`` (text after the image cut from the end) or ``"dropped"`` (ids None: the text
    before the image plus the image alone exceed ``ctx_len``)."""
    if expanded_length(input_ids, n_image_tokens) <= ctx_len:
        return input_ids, labels, "ok"
    if IMAGE_TOKEN_INDEX in input_ids:
        pos = input_ids.index(IMAGE_TOKEN_INDEX)
        if pos + n_image_tokens > ctx_len:  # the image would not end inside the context
            return None, None, "dropped"
        keep = ctx_len - (n_image_tokens - 1)  # ids to keep, the placeholder counted as 1
    else:
        keep = ctx_len
    return input_ids[:keep], labels[:keep], "truncated"


# Per-record outcome flags kept in shared memory (see module docstring).
_OK, _TRUNCATED, _DROPPED, _SKIPPED = 1, 2, 3, 4
ON_BAD_RECORD = ("error", "skip")


class LlavaDataset(Dataset):
    """Map-style dataset of LLaVA records (see the module docstring for items and counters).

    records_or_path: a list of records or a ``.json`` / ``.jsonl`` file.
    image_folder: image paths of the records are relative to it.
    tokenizer: ``WorldTokenizer`` (anything with ``encode(str) -> list[int]``).
    image_processor: a ``transformers`` image processor (e.g. the tower's ``CLIPImageProcessor``);
        may be None only if no record has an image.
    image_position: ``first`` | ``middle`` | ``last`` (SPEC §5).
    ctx_len: longest sequence the model sees, image expanded.
    n_image_tokens: image tokens per image (``num_image_tokens(grid_size, num_patches)``; 577 for
        grid_size -1 on ViT-L/14-336).
    on_bad_record: ``error`` raises ``UserError`` naming the record; ``skip`` leaves it out and
        counts it in ``stats['n_skipped']``.
    check_image_files: check up front that every image file exists (one ``stat`` per record).
    """

    def __init__(self, records_or_path: Union[PathLike, Sequence[Any]], image_folder: Optional[PathLike],
                 tokenizer, image_processor=None, image_position: str = "middle", ctx_len: int = 2048,
                 n_image_tokens: int = 577, on_bad_record: str = "error", check_image_files: bool = True):
        check_image_position(image_position)
        if on_bad_record not in ON_BAD_RECORD:
            raise UserError(f"on_bad_record must be 'error' or 'skip'; got {on_bad_record!r}")
        if ctx_len < 1:
            raise UserError(f"--ctx_len must be positive; got {ctx_len}")
        if n_image_tokens < 1:
            raise UserError(f"the number of image tokens must be positive; got {n_image_tokens}")
        if isinstance(records_or_path, (str, os.PathLike)):
            records = load_records(records_or_path)
            self.source = os.fspath(records_or_path)
        else:
            records = list(records_or_path)
            self.source = "<records>"
        self.image_folder = os.fspath(image_folder) if image_folder is not None else None
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_position = image_position
        self.ctx_len = int(ctx_len)
        self.n_image_tokens = int(n_image_tokens)
        self.on_bad_record = on_bad_record
        self.n_records = len(records)

        # Up-front checks: structure, roles, one <image> per record, image files present.
        self.skipped: List[Tuple[str, str]] = []  # (record id, reason) left out up front
        kept = []
        self._index: List[int] = []  # position in the file of each kept record (for names)
        for index, rec in enumerate(records):
            try:
                validate_record(rec, index)
                if has_image(rec):
                    if self.image_folder is None:
                        raise UserError(f"record {record_id(rec, index)} has an image but no image folder was given "
                                        "(--image_folder)")
                    if image_processor is None:
                        raise UserError("the data has images but no image processor was given")
                    if check_image_files and not os.path.isfile(self._image_path(rec)):
                        raise RecordError(record_id(rec, index), "missing_image",
                                          f"image file not found: {self._image_path(rec)}")
            except RecordError as e:
                if on_bad_record == "error":
                    raise UserError(f"{self.source}: {e} (fix it, or skip bad records; "
                                    "'visualrwkv data check' lists them all)") from None
                self.skipped.append((e.record_id, e.detail))
                continue
            kept.append(rec)
            self._index.append(index)
        self.records = kept
        # One byte per record, in shared memory so DataLoader workers' reads are counted too.
        self._flags = torch.zeros(len(kept), dtype=torch.uint8).share_memory_()

    def _image_path(self, rec: Mapping) -> str:
        return os.path.join(self.image_folder, rec["image"])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def stats(self) -> Dict[str, int]:
        """Counters (see the module docstring)."""
        flags = self._flags
        return {
            "n_records": self.n_records,
            "n_truncated": int((flags == _TRUNCATED).sum()),
            "n_dropped": int((flags == _DROPPED).sum()),
            "n_skipped": len(self.skipped) + int((flags == _SKIPPED).sum()),
        }

    def tokenize(self, i: int) -> Tuple[List[int], List[int]]:
        """``(input_ids, labels)`` of record i before truncation."""
        return tokenize_record(self.records[i], self.tokenizer, self.image_position)

    def __getitem__(self, i: int) -> Optional[Dict[str, Any]]:
        rec = self.records[i]
        rid = record_id(rec, self._index[i])
        ids, labels = self.tokenize(i)
        ids, labels, outcome = fit_to_context(ids, labels, self.ctx_len, self.n_image_tokens)
        if outcome == "dropped":
            self._flags[i] = _DROPPED
            return None
        pixel_values = None
        if has_image(rec):
            path = self._image_path(rec)
            try:
                img = open_image(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                reason = "image file not found" if isinstance(e, FileNotFoundError) else f"cannot read image ({e})"
                if self.on_bad_record == "error":
                    raise UserError(f"record {rid}: {reason}: {path}") from None
                self._flags[i] = _SKIPPED
                return None
            # The processor resizes, centre-crops and normalises: (1, 3, H, W) -> (3, H, W).
            pixel_values = self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
            pixel_values = torch.as_tensor(pixel_values, dtype=torch.float32)
        self._flags[i] = _TRUNCATED if outcome == "truncated" else _OK
        return {
            "id": rid,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def iter_token_lengths(self) -> Iterator[int]:
        """Expanded length of every record (no images read); for statistics."""
        for i in range(len(self.records)):
            yield expanded_length(self.tokenize(i)[0], self.n_image_tokens)


def collate(items: Sequence[Optional[Mapping[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Samples -> one batch, padded on the right to the longest sample only.

    Returns ``input_ids`` (B, Tmax) padded with 0, ``labels`` (B, Tmax) padded with -100,
    ``lengths`` (B,), ``has_image`` bool (B,), ``pixel_values`` (n_with_image, 3, H, W) in
    sample order (None if no sample has an image) and ``ids`` (list of B str). ``None`` items
    (dropped or skipped samples) are left out; if nothing is left the result is None.
    Tmax counts the placeholder as one id: the model expands the image itself.
    """
    items = [it for it in items if it is not None]
    if not items:
        return None
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.long)
    B, T = len(items), int(lengths.max())
    input_ids = torch.full((B, T), EOT_ID, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[b, :n] = it["input_ids"]
        labels[b, :n] = it["labels"]
    has_img = torch.tensor([it.get("pixel_values") is not None for it in items], dtype=torch.bool)
    pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "lengths": lengths,
        "has_image": has_img,
        "pixel_values": torch.stack(pixels) if pixels else None,
        "ids": [it["id"] for it in items],
    }
