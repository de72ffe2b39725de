"""``visualrwkv data check``: find every problem of a LLaVA data file before training.

One pass over the file reports, per record: invalid JSON lines (JSONL), malformed records,
unknown roles, empty turns, several ``<image>`` placeholders, an image without a placeholder,
missing or corrupt images (each distinct file is fully decoded once), and samples longer than
``ctx_len`` with the image expanded (cut after the image = warning; the image itself does not fit
= error, the sample would be dropped). Nothing here raises for bad data: every problem becomes a
row of the report and a line of the bad-ids file.
"""
from __future__ import annotations

import os
import statistics
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, TextIO, Tuple

from visualrwkv.constants import DEFAULT_IMAGE_TOKEN
from visualrwkv.data.conversation import RecordError, has_image, record_id, tokenize_record, validate_record
from visualrwkv.data.dataset import expanded_length, fit_to_context, read_records
from visualrwkv.errors import UserError

# kind -> (severity, label in the summary). Errors make a record unusable for training (the
# dataset would refuse or skip it); warnings are usable but worth a look.
PROBLEMS: Dict[str, Tuple[str, str]] = {
    "unreadable_file": ("error", "data file unreadable / not JSON"),
    "invalid_json": ("error", "invalid JSON line"),
    "malformed": ("error", "malformed record"),
    "unknown_role": ("error", "unknown role in 'from'"),
    "multiple_images": ("error", "several <image> in one record"),
    "image_without_placeholder": ("error", "image but no <image> in text"),
    "missing_image": ("error", "image file missing"),
    "corrupt_image": ("error", "image file corrupt / truncated"),
    "too_long_dropped": ("error", "over ctx_len, image does not fit"),
    "empty_turn": ("warning", "empty turn"),
    "image_token_without_image": ("warning", "<image> in text, no image"),
    "too_long_truncated": ("warning", "over ctx_len, end cut off"),
}

PROGRESS_MIN = 2000  # show progress bars from this many items on


@dataclass
class Problem:
    kind: str
    record: str  # record id, "#index" without one, or "line:N" for a line that is not JSON
    detail: str

    @property
    def severity(self) -> str:
        return PROBLEMS[self.kind][0]


@dataclass
class CheckReport:
    data_file: str
    n_records: int = 0
    n_with_image: int = 0
    n_text_only: int = 0
    lengths: List[int] = field(default_factory=list)  # expanded length of every tokenizable record
    problems: List[Problem] = field(default_factory=list)
    images_checked: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)

    @property
    def n_errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    @property
    def n_warnings(self) -> int:
        return sum(1 for p in self.problems if p.severity == "warning")


def _progress(iterable, total: int, desc: str, enabled: bool):
    # tqdm only on long runs; disable=None lets tqdm turn itself off when stderr is not a terminal.
    if not enabled or total < PROGRESS_MIN:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec" if desc == "records" else "img", disable=None)


def verify_image(path: str) -> Optional[Tuple[str, str]]:
    """None if the file opens and fully decodes; else ``(kind, message)``."""
    from PIL import Image

    if not os.path.exists(path):
        return "missing_image", f"image file not found: {path}"
    if not os.path.isfile(path):
        return "missing_image", f"image path is not a file: {path}"
    try:
        with Image.open(path) as img:
            img.load()  # decode every byte: a truncated file fails here, not mid-training
    except Exception as e:  # noqa: BLE001 - PIL raises many exception types for bad files
        return "corrupt_image", f"cannot decode image {path}: {type(e).__name__}: {e}"
    return None


def check_data(data_file: str, image_folder: Optional[str], tokenizer, image_position: str = "middle",
               ctx_len: int = 2048, n_image_tokens: int = 577, workers: int = 0,
               progress: bool = True) -> CheckReport:
    """Check a data file; never raises for bad data (see module docstring)."""
    from PIL import ImageFile

    # Truncated images must be reported, not padded with grey (the original turned this global
    # switch on); put back whatever the caller had afterwards.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        return _check(data_file, image_folder, tokenizer, image_position, ctx_len, n_image_tokens, workers, progress)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check(data_file, image_folder, tokenizer, image_position, ctx_len, n_image_tokens, workers, progress):
    report = CheckReport(data_file=data_file)
    try:
        records, bad_lines, line_of = read_records(data_file)
    except UserError as e:
        report.problems.append(Problem("unreadable_file", os.path.basename(data_file), str(e)))
        return report
    for line, msg, guessed in bad_lines:
        report.problems.append(Problem("invalid_json", guessed or f"line:{line}", f"line {line}: {msg}"))
    report.n_records = len(records) + len(bad_lines)

    # Pass 1: structure, roles, placeholders, tokens and lengths.
    image_users: Dict[str, List[Tuple[str, str]]] = {}  # image path -> (name, where) of its records
    for index, rec in enumerate(_progress(records, len(records), "records", progress)):
        name = record_id(rec, index)
        where = f"line {line_of[index]}" if line_of[index] else f"record #{index}"
        try:
            validate_record(rec, index)
        except RecordError as e:
            report.problems.append(Problem(e.kind, name, f"{where}: {e.detail}"))
            continue
        with_image = has_image(rec)
        if with_image:
            report.n_with_image += 1
        else:
            report.n_text_only += 1
        for k, turn in enumerate(rec["conversations"]):
            if not turn["value"].strip():
                report.problems.append(Problem("empty_turn", name, f"{where}: turn {k} ({turn['from']}) is empty"))
            if not with_image and DEFAULT_IMAGE_TOKEN in turn["value"]:
                report.problems.append(Problem("image_token_without_image", name,
                                               f"{where}: turn {k} has {DEFAULT_IMAGE_TOKEN} but the record has no "
                                               "image (it is read as plain text)"))
        ids, labels = tokenize_record(rec, tokenizer, image_position)
        n = expanded_length(ids, n_image_tokens)
        report.lengths.append(n)
        _, _, outcome = fit_to_context(ids, labels, ctx_len, n_image_tokens)  # same rule as training
        if outcome != "ok":
            if outcome == "dropped":
                report.problems.append(Problem("too_long_dropped", name,
                                               f"{where}: {n} tokens; text before the image plus {n_image_tokens} "
                                               f"image tokens exceed ctx_len {ctx_len}: the sample would be dropped"))
            else:
                report.problems.append(Problem("too_long_truncated", name,
                                               f"{where}: {n} tokens > ctx_len {ctx_len}: the end is cut"))
        if with_image:
            if image_folder is None:
                continue
            image_users.setdefault(os.path.join(image_folder, rec["image"]), []).append((name, where))

    # Pass 2: decode every distinct image once. PIL releases the GIL while decoding, so threads help.
    paths = sorted(image_users)
    n_workers = workers if workers > 0 else min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "possibly corrupt EXIF" chatter; real failures raise
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = pool.map(verify_image, paths)
            for path, res in zip(paths, _progress(results, len(paths), "images", progress)):
                report.images_checked += 1
                if res is None:
                    continue
                kind, msg = res
                for name, where in image_users[path]:
                    report.problems.append(Problem(kind, name, f"{where}: {msg}"))
    return report


def _percentile(sorted_values: List[int], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a sorted list."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def print_summary(report: CheckReport, settings: str, out: Optional[TextIO] = None, examples: int = 3,
                  details: int = 10) -> None:
    """The summary table: one row per kind of problem, the first ``details`` problems in full,
    then records and token lengths."""
    out = out or sys.stdout
    w = max(len(label) for _, label in PROBLEMS.values())
    print(f"data file: {report.data_file}", file=out)
    print(settings, file=out)
    print("", file=out)
    print(f"{'problem':<{w}}  {'severity':<8}  {'count':>7}  examples", file=out)
    print(f"{'-' * w}  {'-' * 8}  {'-' * 7}  {'-' * 8}", file=out)
    for kind, (severity, label) in PROBLEMS.items():
        names = [p.record for p in report.problems if p.kind == kind]
        unique = list(dict.fromkeys(names))  # distinct, in order of appearance
        shown = ", ".join(unique[:examples])
        if len(unique) > examples:
            shown += ", ..."
        print(f"{label:<{w}}  {severity:<8}  {len(names):>7}  {shown}", file=out)
    if report.problems:
        print("", file=out)
        print(f"first problems ({min(details, len(report.problems))} of {len(report.problems)}):", file=out)
        for p in report.problems[:details]:
            print(f"  {p.record}: {p.severity}: {p.detail}", file=out)
    print("", file=out)
    print(f"records: {report.n_records} (with image {report.n_with_image}, text-only {report.n_text_only}); "
          f"distinct image files checked: {report.images_checked}", file=out)
    if report.lengths:
        s = sorted(report.lengths)
        print(f"tokens per sample, image expanded: min {s[0]}  mean {statistics.fmean(s):.1f}  "
              f"median {statistics.median(s):g}  p95 {_percentile(s, 95):.1f}  max {s[-1]}", file=out)
    else:
        print("tokens per sample: no usable record", file=out)
    print(f"errors: {report.n_errors}  warnings: {report.n_warnings}", file=out)


def write_bad_ids(report: CheckReport, path: str) -> None:
    """One line per problem: ``record-id<TAB>severity<TAB>kind<TAB>detail``."""
    with open(path, "w", encoding="utf-8") as f:
        for p in report.problems:
            record, detail = (x.replace("\n", " ").replace("\t", " ") for x in (p.record, p.detail))
            f.write(f"{record}\t{p.severity}\t{p.kind}\t{detail}\n")


def iter_bad_ids(path: str) -> Iterable[str]:
    """Record ids listed in a bad-ids file (first column)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.split("\t", 1)[0]
