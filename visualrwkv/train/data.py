"""Training data: the up-front data check, the dataset and the DataLoader (SPEC §5, §7, §9).

Bad data never kills a run midway. Before training, every record the run will read (the sample
order is deterministic, so that set is known) is checked with the data pipeline's own rules:
structure and roles, one ``<image>`` per record, the sample fits ``ctx_len`` with the image
expanded (a sample whose image would be cut is dropped = an error), the image file exists and
fully decodes. Then:

- ``--bad_records error`` (default): refuse to start, naming the bad records;
- ``--bad_records skip``: leave them out (the sample order is computed over the records that
  remain) and write the count to the log.

The verdicts are cached in ``PROJ_DIR/data_check.json`` (keyed by the data file's path, size and
modification time and the settings that change a verdict), so a resumed run, and the other
processes of a multi-GPU run, do not decode every image again. Delete the file to force a new check.

An image that goes bad *after* the check (deleted mid-run) is skipped when read and counted; a
micro-batch left with no sample becomes an empty step (zero loss, see ``module.py``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from visualrwkv.errors import UserError

CACHE_NAME = "data_check.json"
CACHE_VERSION = 1
SHOW_IDS = 10  # bad record ids named in the error message


@dataclass
class PreparedData:
    records: List[Any]  # the records training reads from (bad ones removed in skip mode)
    n_file: int  # records in the file (valid JSON)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (id, kind, detail) left out
    n_invalid_lines: int = 0  # JSONL lines that are not JSON (skip mode)
    n_truncated: int = 0  # checked samples longer than ctx_len, cut after the image
    n_checked: int = 0  # records checked (fresh or cached)
    check_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
def _check_one(rec: Any, index: int, tokenizer, image_folder: Optional[str], image_position: str, ctx_len: int,
               n_image_tokens: int) -> Tuple[Optional[Tuple[str, str]], bool, Optional[str]]:
    """Text-side check of one record: ((kind, detail) or None, truncated, image path or None)."""
    from visualrwkv.data.conversation import RecordError, has_image, tokenize_record, validate_record
    from visualrwkv.data.dataset import expanded_length, fit_to_context

    try:
        validate_record(rec, index)
    except RecordError as e:
        return (e.kind, e.detail), False, None
    ids, labels = tokenize_record(rec, tokenizer, image_position)
    _, _, outcome = fit_to_context(ids, labels, ctx_len, n_image_tokens)
    if outcome == "dropped":
        n = expanded_length(ids, n_image_tokens)
        return ("too_long_dropped", f"{n} tokens; the text before the image plus {n_image_tokens} image tokens "
                                    f"exceed ctx_len {ctx_len}"), False, None
    path = None
    if has_image(rec):
        if image_folder is None:
            return ("missing_image", "the record has an image but no --image_folder was given"), False, None
        path = os.path.join(image_folder, rec["image"])
    return None, outcome == "truncated", path


def _cache_key(data_file: str, image_folder: Optional[str], image_position: str, ctx_len: int,
               n_image_tokens: int) -> Dict[str, Any]:
    st = os.stat(data_file)
    return {"version": CACHE_VERSION, "data_file": os.path.abspath(data_file), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "image_folder": os.path.abspath(image_folder) if image_folder else None,
            "image_position": image_position, "ctx_len": ctx_len, "n_image_tokens": n_image_tokens}


def _load_cache(path: str, key: Dict[str, Any]) -> Dict[int, Optional[List[Any]]]:
    """index -> None (good) / [kind, detail, truncated] for records checked before with this key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("key") != key:
        return {}
    out: Dict[int, Optional[List[Any]]] = {i: None for i in data.get("good", [])}
    for i in data.get("truncated", []):
        out[i] = ["", "", True]
    for i, v in data.get("bad", {}).items():
        out[int(i)] = v
    return out


def _save_cache(path: str, key: Dict[str, Any], verdicts: Dict[int, Optional[List[Any]]]) -> None:
    good = sorted(i for i, v in verdicts.items() if v is None)
    truncated = sorted(i for i, v in verdicts.items() if v is not None and v[0] == "")
    bad = {str(i): v for i, v in sorted(verdicts.items()) if v is not None and v[0] != ""}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "good": good, "truncated": truncated, "bad": bad}, f)
    os.replace(tmp, path)  # other processes never see a half-written file


def check_records(records: Sequence[Any], indices: Sequence[int], tokenizer, image_folder: Optional[str],
                  image_position: str, ctx_len: int, n_image_tokens: int, workers: int = 0,
                  progress: bool = False) -> Dict[int, Optional[List[Any]]]:
    """Check the given record indices. Returns index -> None (good), ["", "", True] (good but cut
    after the image) or [kind, detail, False] (bad). Each distinct image file is decoded once."""
    from visualrwkv.data.check import verify_image

    verdicts: Dict[int, Optional[List[Any]]] = {}
    users: Dict[str, List[int]] = {}  # image path -> record indices that use it
    for i in indices:
        bad, truncated, path = _check_one(records[i], i, tokenizer, image_folder, image_position, ctx_len,
                                          n_image_tokens)
        if bad is not None:
            verdicts[i] = [bad[0], bad[1], False]
            continue
        verdicts[i] = ["", "", True] if truncated else None
        if path is not None:
            users.setdefault(path, []).append(i)
    paths = sorted(users)
    n_workers = workers if workers > 0 else min(16, os.cpu_count() or 1)
    t0, done = time.time(), 0
    # PIL releases the GIL while decoding, so threads decode images in parallel.
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for path, res in zip(paths, pool.map(verify_image, paths)):
            done += 1
            if progress and (done % 20000 == 0):
                print(f"data check: {done}/{len(paths)} images decoded ({time.time() - t0:.0f}s)", file=sys.stderr)
            if res is not None:
                for i in users[path]:
                    verdicts[i] = [res[0], res[1], False]
    return verdicts


def prepare_records(data_file: str, image_folder: Optional[str], tokenizer, *, image_position: str, ctx_len: int,
                    n_image_tokens: int, s_begin: int, s_end: int, bad_records: str = "error",
                    cache_dir: Optional[str] = None, is_main: bool = True) -> PreparedData:
    """Load the data file and check every record that global samples s_begin <= s < s_end read.

    In skip mode bad records are removed; that changes n and so the sample order, so the set of
    records read is computed again over what remains until every record it reads is checked."""
    from visualrwkv.data.conversation import record_id
    from visualrwkv.data.dataset import read_records
    from visualrwkv.train.schedule import records_read

    if not os.path.isfile(data_file):
        raise UserError(f"--data_file {data_file}: file not found")
    t0 = time.time()
    records, problems, _ = read_records(data_file)
    n_invalid = 0
    if problems:
        if bad_records == "error":
            lines = ", ".join(str(line) for line, _, _ in problems[:SHOW_IDS])
            more = f" and {len(problems) - SHOW_IDS} more" if len(problems) > SHOW_IDS else ""
            raise UserError(f"{data_file}: {len(problems)} line(s) are not valid JSON (lines {lines}{more}); fix them "
                            "or pass --bad_records skip ('visualrwkv data check' lists every problem)")
        n_invalid = len(problems)

    key = _cache_key(data_file, image_folder, image_position, ctx_len, n_image_tokens)
    cache_path = os.path.join(cache_dir, CACHE_NAME) if cache_dir else None
    verdicts = _load_cache(cache_path, key) if cache_path else {}
    n_cached = len(verdicts)

    keep = list(range(len(records)))  # indices into `records` of the records training reads from
    if len(keep) < 3:
        raise UserError(f"{data_file} has {len(keep)} record(s); training needs at least 3")
    if (image_folder is None or not os.path.isdir(image_folder)) and any(
            isinstance(r, dict) and r.get("image") for r in records):
        raise UserError(f"--image_folder {image_folder}: folder not found (the data has images)")
    while True:
        wanted = sorted(keep[j] for j in records_read(len(keep), s_begin, s_end))
        todo = [i for i in wanted if i not in verdicts]
        if todo:
            if is_main and len(todo) > 2000:
                print(f"data check: {len(todo)} records ...", file=sys.stderr)
            verdicts.update(check_records(records, todo, tokenizer, image_folder, image_position, ctx_len,
                                          n_image_tokens, progress=is_main))
        bad = [i for i in wanted if verdicts[i] is not None and verdicts[i][0] != ""]
        if not bad:
            break
        if bad_records == "error":
            if cache_path:
                _save_cache(cache_path, key, verdicts)
            names = [f"{record_id(records[i], i)} ({verdicts[i][0]})" for i in bad[:SHOW_IDS]]
            more = f" and {len(bad) - SHOW_IDS} more" if len(bad) > SHOW_IDS else ""
            first = verdicts[bad[0]][1]
            raise UserError(f"{len(bad)} record(s) that this run would read fail the data check: "
                            f"{', '.join(names)}{more}; first: {first}. Fix the data, or pass --bad_records skip "
                            f"to leave them out ('visualrwkv data check --data_file {data_file} ...' lists them all)")
        bad_set = set(bad)
        keep = [i for i in keep if i not in bad_set]
        if len(keep) < 3:
            raise UserError(f"only {len(keep)} record(s) of {data_file} pass the data check; nothing to train on")
    if cache_path and len(verdicts) != n_cached and is_main:
        _save_cache(cache_path, key, verdicts)
    kept = set(keep)
    skipped = [(record_id(records[i], i), verdicts[i][0], verdicts[i][1]) for i in sorted(verdicts)
               if i not in kept and verdicts[i] is not None and verdicts[i][0] != ""]
    wanted_set = set(keep[j] for j in records_read(len(keep), s_begin, s_end))
    n_trunc = sum(1 for i in wanted_set if verdicts.get(i) is not None and verdicts[i][0] == "")
    return PreparedData(records=[records[i] for i in keep], n_file=len(records), skipped=skipped,
                        n_invalid_lines=n_invalid, n_truncated=n_trunc, n_checked=len(wanted_set),
                        check_seconds=time.time() - t0)


# ---------------------------------------------------------------------------------------------
def collate_train(items):
    """``visualrwkv.data.dataset.collate`` plus an explicit empty batch when every sample of a
    micro-batch was dropped (Lightning would skip a None batch and shift the step count)."""
    from visualrwkv.data.dataset import collate

    batch = collate(items)
    if batch is None:
        return {"empty": True, "input_ids": torch.zeros(0, 1, dtype=torch.long)}
    return batch


def resolve_num_workers(requested: int, accelerator_is_gpu: bool, devices_per_node: int) -> int:
    if requested >= 0:
        return requested
    if not accelerator_is_gpu:
        return 0  # CPU training: loading in the main process keeps the cores for compute
    cores = os.cpu_count() or 1
    return max(1, min(4, cores // max(1, devices_per_node) - 1))


class ResumableLoader(DataLoader):
    """A DataLoader whose position (mini-epoch, micro-batch) is the sampler's. Having
    ``state_dict`` / ``load_state_dict`` tells Lightning that resuming mid-epoch is exact."""

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.sampler.epoch, "batch": self.sampler.batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.set_position(state["epoch"], state["batch"])


def make_loader(dataset, sampler, micro_bsz: int, num_workers: int, pin_memory: bool) -> DataLoader:
    # The sampler runs in the main process and only sends indices to the workers, so workers can
    # stay alive across mini-epochs (the position lives in the sampler, not in the dataset).
    # A private generator: creating a DataLoader iterator draws a seed from it, and drawing from the
    # global RNG would shift dropout masks between a resumed and an uninterrupted run (loading
    # itself uses no randomness).
    return ResumableLoader(dataset, batch_size=micro_bsz, sampler=sampler, shuffle=False, drop_last=False,
                           num_workers=num_workers, persistent_workers=num_workers > 0,
                           prefetch_factor=4 if num_workers > 0 else None, pin_memory=pin_memory,
                           collate_fn=collate_train, generator=torch.Generator().manual_seed(0))
