"""``visualrwkv data {check,show,synth}``.

    visualrwkv data check --data_file llava_v1_5_mix665k.json --image_folder ./playground/data --ctx_len 2048
    visualrwkv data show  --data_file llava_v1_5_mix665k.json --limit 3
    visualrwkv data synth ...      (see 'visualrwkv data synth --help')
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import List, Optional, Sequence

from visualrwkv.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.errors import UserError

CHECK_EXAMPLE = ("visualrwkv data check --data_file /data/llava_v1_5_mix665k.json --image_folder /data/images "
                 "--image_position middle --ctx_len 2048 --grid_size -1 --bad_ids_out bad_ids.txt")
SHOW_EXAMPLE = ("visualrwkv data show --data_file /data/llava_v1_5_mix665k.json --image_folder /data/images "
                "--image_position middle --limit 3")

USAGE = """usage: visualrwkv data <command> [options]

commands:
  check   find every problem of a LLaVA data file (JSON, images, lengths) before training
  show    print records as the model sees them: prompt, ids, and which tokens are trained
  synth   write a small synthetic LLaVA-format data set (images + JSON)

Run 'visualrwkv data <command> --help' for a command's options."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line from the CLI) instead of printing usage + exit 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _n_image_tokens(grid_size: int, num_patches: int) -> int:
    from visualrwkv.models.pooling import num_image_tokens

    try:
        return num_image_tokens(grid_size, num_patches)
    except ValueError as e:
        raise UserError(str(e)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_file", required=True, help="LLaVA data: a JSON list of records or a JSONL file")
    p.add_argument("--image_folder", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--image_position", default="middle", choices=["first", "middle", "last"],
                   help="where the image goes in the prompt (default: middle, the paper's best)")
    p.add_argument("--grid_size", type=int, default=-1, help="image pooling of the model (default -1: 577 tokens)")
    p.add_argument("--num_patches", type=int, default=576, help="patch tokens of the vision tower (576 for ViT-L/14-336)")


# --------------------------------------------------------------------------------------------
# check
def check_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="visualrwkv data check", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Check a LLaVA data file before training: invalid JSON lines, malformed records, "
                            "unknown roles, empty turns, several <image>, missing or corrupt images, samples "
                            "over ctx_len. Prints a summary, writes the bad record ids with the reason, and exits "
                            "with 1 when errors are found (warnings too with --strict).",
                epilog=f"example:\n  {CHECK_EXAMPLE}")
    _common(p)
    p.add_argument("--ctx_len", type=int, default=2048, help="training context length, image expanded (default 2048)")
    p.add_argument("--bad_ids_out", default=None,
                   help="where to write bad record ids (default: <data_file>.bad_ids.txt, written only if problems)")
    p.add_argument("--workers", type=int, default=0, help="threads decoding images (default: min(8, CPUs))")
    p.add_argument("--strict", action="store_true", help="exit with 1 on warnings too")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(list(argv))
    if args.ctx_len < 1:
        raise UserError(f"--ctx_len must be positive; got {args.ctx_len}")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise UserError(f"--image_folder {args.image_folder} is not a folder")
    n_img = _n_image_tokens(args.grid_size, args.num_patches)

    from visualrwkv.data.check import check_data, print_summary, write_bad_ids
    from visualrwkv.tokenizer import get_tokenizer

    report = check_data(args.data_file, args.image_folder, get_tokenizer(), args.image_position, args.ctx_len,
                        n_img, workers=args.workers, progress=not args.no_progress)
    settings = (f"image folder: {args.image_folder or '(not given: images not checked)'}\n"
                f"image position: {args.image_position}, ctx_len: {args.ctx_len}, image tokens: {n_img} "
                f"(grid_size {args.grid_size}, {args.num_patches} patches)")
    print_summary(report, settings)
    if report.count("unreadable_file"):
        pass  # no records were read: nothing to list
    elif report.problems:
        out = args.bad_ids_out or args.data_file + ".bad_ids.txt"
        try:
            write_bad_ids(report, out)
            print(f"bad record ids written to: {out}")
        except OSError as e:
            print(f"could not write the bad record ids to {out} ({e.strerror or e}); pass --bad_ids_out FILE",
                  file=sys.stderr)
    else:
        if args.bad_ids_out:  # an explicit file always reflects the last run
            write_bad_ids(report, args.bad_ids_out)
        print("no problems found")
    failed = report.n_errors > 0 or (args.strict and report.n_warnings > 0)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# show
def _trained_view(ids: List[int], labels: List[int], tokenizer) -> str:
    """The decoded sequence with trained tokens between [[ and ]] and the image as <image>."""
    out, run, trained = [], [], False

    def flush():
        if run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run.clear()

    for t, lab in zip(ids, labels):
        if t == IMAGE_TOKEN_INDEX:
            flush()
            out.append("<image>")
            continue
        is_trained = lab != IGNORE_INDEX
        if is_trained != trained:
            flush()
            trained = is_trained
        run.append(t)
    flush()
    return "".join(out)


def show_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="visualrwkv data show", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Print records as the model sees them: the prompt text, the ids (image = -200), the "
                            "loss mask, and the text with the trained tokens between [[ and ]].",
                epilog=f"example:\n  {SHOW_EXAMPLE}\n  visualrwkv data show --data_file data.jsonl --json --limit 0 > ids.jsonl")
    _common(p)
    p.add_argument("--limit", type=int, default=5, help="records to show (default 5; 0 = all)")
    p.add_argument("--id", default=None, help="show only records with this id")
    p.add_argument("--json", action="store_true", help="one JSON object per record (JSONL) instead of text")
    args = p.parse_args(list(argv))
    n_img = _n_image_tokens(args.grid_size, args.num_patches)

    from visualrwkv.data.conversation import RecordError, has_image, prepare_turns, prompt_text, record_id, tokenize_turns
    from visualrwkv.data.dataset import expanded_length, load_records
    from visualrwkv.tokenizer import get_tokenizer

    tok = get_tokenizer()
    records = load_records(args.data_file)
    shown = 0
    for index, rec in enumerate(records):
        if args.limit and shown >= args.limit:
            break
        name = record_id(rec, index)
        if args.id is not None and name != args.id:
            continue
        shown += 1
        image = rec.get("image") if isinstance(rec, dict) else None
        try:
            turns = prepare_turns(rec, args.image_position)
        except RecordError as e:
            if args.json:
                print(json.dumps({"id": name, "index": index, "error": e.detail}, ensure_ascii=False))
            else:
                print(f"=== {name} (record #{index}): ERROR: {e.detail}\n")
            continue
        ids, labels = tokenize_turns(turns, tok, split_image=has_image(rec))
        text = prompt_text(turns)
        n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
        image_ok = None
        if image and args.image_folder:
            image_ok = os.path.isfile(os.path.join(args.image_folder, image))
        if args.json:
            print(json.dumps({"id": name, "index": index, "image": image, "image_exists": image_ok, "text": text,
                              "input_ids": ids, "labels": labels, "n_ids": len(ids),
                              "n_tokens_expanded": expanded_length(ids, n_img), "n_trained": n_trained,
                              "trained_text": _trained_view(ids, labels, tok)}, ensure_ascii=False))
            continue
        img_note = ""
        if image:
            img_note = f"  image: {image}" + ("" if image_ok is None else (" (found)" if image_ok else " (MISSING)"))
        print(f"=== {name} (record #{index}){img_note}")
        print(f"{len(ids)} ids, {expanded_length(ids, n_img)} tokens with the image expanded ({n_img} image tokens), "
              f"{n_trained} trained")
        print("--- prompt")
        print(text)
        print("--- input_ids (-200 = image)")
        print(ids)
        print("--- loss mask (# trained, . not trained, I image)")
        print("".join("I" if t == IMAGE_TOKEN_INDEX else ("#" if lab != IGNORE_INDEX else ".")
                      for t, lab in zip(ids, labels)))
        print("--- trained tokens between [[ ]]")
        print(_trained_view(ids, labels, tok))
        print()
    if shown == 0 and args.id is not None:
        raise UserError(f"no record with id {args.id!r} in {args.data_file}")
    return 0


# --------------------------------------------------------------------------------------------
def synth_main(argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module("visualrwkv.data.synth")
    except ModuleNotFoundError as e:
        if e.name == "visualrwkv.data.synth":
            raise UserError("'visualrwkv data synth' is not available in this installation") from None
        raise
    return int(mod.main(list(argv)) or 0)


SUBCOMMANDS = {"check": check_main, "show": show_main, "synth": synth_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = SUBCOMMANDS.get(argv[0])
    if cmd is None:
        raise UserError(f"unknown data command {argv[0]!r}; use check, show or synth")
    try:
        return cmd(argv[1:])
    except BrokenPipeError:
        # Output piped into e.g. 'head' that stopped reading: not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"visualrwkv data: error: {e}", file=sys.stderr)
        sys.exit(2)
