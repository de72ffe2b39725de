"""Built-in synthetic visual-question data for the quickstart and the tests.

Every image is a plain white square with 1-3 simple shapes on it. Each shape has a *shape*
(circle, square, triangle, star, cross), a *colour* (six clearly distinct named colours), a *size*
(small / large) and a *position*: the centre of one cell of a 2 x 2 grid -- ``top left``,
``top right``, ``bottom left``, ``bottom right`` -- with a little jitter. Within one image the
shapes, the colours and the cells are all different, so every object can be named by its shape,
its colour or its position alone, and every question below has exactly one correct answer.
A shape never leaves its cell, so a vision tower whose patches are the cells (the quickstart's:
64 px images, 32 px patches) sees each object whole in one patch.

Files written by :func:`generate` (``OUT`` = the output folder; image paths in the records are
relative to ``OUT/images``, which is what ``--image_folder`` should point at)::

    OUT/images/train_000000.png ...   training images (stage 1 and stage 2 share them)
    OUT/images/test_000000.png ...    held-out images (a disjoint seed stream, never equal to a train image)
    OUT/stage1.json                   LLaVA JSON, one caption record per train image
    OUT/stage2.json                   LLaVA JSON, one record of 1-3 question/answer turns per train image
    OUT/test.jsonl                    LLaVA evaluation layout, one question per line: question_id,
                                      image, text, answer, type (and category = type)
    OUT/test_answers.jsonl            the ground truth alone: question_id, answer, type
    OUT/scenes.json                   what was drawn on every image (for checking and debugging)
    OUT/info.json                     seed, sizes, counts, answer spaces, chance levels per type

Question types (``"type"`` in the records) and their answers (a word or two)::

    colour    "What colour is the shape at the top left?"    -> red | green | blue | yellow | purple | orange
    shape     "What shape is at the bottom right?"           -> circle | square | triangle | star | cross
    count     "How many shapes are there?"                   -> 1 | 2 | 3
    position  "Where is the blue shape?" / "Where is the star?"
                                                             -> top left | top right | bottom left | bottom right
    size      "Is the shape at the top right small or large?" -> small | large
    yesno     "Is the shape at the top left red?" / "Is there a star at the bottom left?"
                                                             -> yes | no (balanced; half of the "no"s name the
                                                                colour or shape of another object in the image,
                                                                and the asked cell may be empty)

Attribute questions name their object by its cell, as the stage-1 captions do; position questions
name it by its colour or its shape.

Every question ends with LLaVA's "Answer the question using a single word or phrase." -- the
same convention as the LLaVA mix665k short-answer data and the VQAv2 / GQA evaluation files.

Determinism: every image has its own ``random.Random`` seeded with a string made of the seed, the
split and the image index (string seeds are hashed with SHA-512 by ``random``, independent of
``PYTHONHASHSEED``), so the same arguments always give byte-identical files, and adding training
images does not change the earlier ones. No global random state (``random``, numpy, torch) is used
or touched.

Command line::

    visualrwkv data synth --out data/synth [--seed 0 --n_train 2000 --n_test 200 --image_size 64]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

from visualrwkv.errors import UserError

FORMAT_VERSION = 2

# ----------------------------------------------------------------------------------------------
# The visual vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated colours, far apart in RGB and from the white background.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
BACKGROUND: Tuple[int, int, int] = (255, 255, 255)

# "Radius" r of a shape as a fraction of the image side. Every shape lies inside a disc of
# radius MAX_EXTENT * r around its centre (see _shape_outline).
SIZES: Dict[str, float] = {"small": 0.09, "large": 0.15}
MAX_EXTENT = 1.15

# Cell centres as fractions of the image side (x, y): a 2 x 2 grid. Each centre is moved by up to
# JITTER in x and y. A large shape reaches MAX_EXTENT * 0.15 = 0.1725 from its centre, so it keeps
# 0.25 - 0.02 - 0.1725 > 0 from every edge of its cell: shapes never overlap, never get cut and
# never cross into a neighbouring cell.
POSITIONS: Dict[str, Tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
JITTER = 0.02
POSITION_PHRASES: Dict[str, str] = {p: f"at the {p}" for p in POSITIONS}
CAPTION_ORDER: Tuple[str, ...] = tuple(POSITIONS)  # objects are listed in reading order

SUPERSAMPLE = 4  # draw at 4x and box-average down: smooth edges, still exactly reproducible

# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------

QUESTION_TYPES: Tuple[str, ...] = ("colour", "shape", "count", "position", "size", "yesno")
ANSWER_SUFFIX = "Answer the question using a single word or phrase."

CAPTION_PROMPTS: Tuple[str, ...] = (
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Write a short caption for the image.",
    "What is in this picture?",
    "Summarize the visual content of the image.",
)

# How a question names its object. colour / shape / size questions (and yes/no) name it by its
# cell ({where}: "at the top left"), as the stage-1 captions list objects cell by cell; position
# questions name it by one attribute ({colour} or {shape}) and ask for the cell. {a} is the
# article for the word after it.
TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "colour": (
        "What colour is the shape {where}?",
        "What color is the shape {where}?",
        "What is the colour of the shape {where}?",
    ),
    "shape": (
        "What shape is {where}?",
        "What kind of shape is {where}?",
        "Which shape is drawn {where}?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many objects can you see?",
    ),
    "position": (
        "Where is the {colour} shape?",
        "Where is the {shape}?",
        "In which part of the image is the {shape}?",
        "Where is the {colour} object?",
    ),
    "size": (
        "Is the shape {where} small or large?",
        "What size is the shape {where}?",
    ),
    # {colour} / {shape}: the one asked about, true or not.
    "yesno": (
        "Is the shape {where} {colour}?",
        "Is there {a} {shape} {where}?",
    ),
}


def answer_space(max_shapes: int = 3) -> Dict[str, Tuple[str, ...]]:
    """All possible answers of every question type."""
    return {
        "colour": tuple(COLOURS),
        "shape": SHAPES,
        "count": tuple(str(n) for n in range(1, max_shapes + 1)),
        "position": tuple(POSITIONS),
        "size": tuple(SIZES),
        "yesno": ("yes", "no"),
    }


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. cx, cy, r are in pixels of the final image (r: see SIZES)."""

    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    r: float


def sample_scene(rng: random.Random, image_size: int = 64, max_shapes: int = 3) -> List[SceneObject]:
    """Draw 1..max_shapes objects with pairwise different shapes, colours and slots."""
    n = rng.randint(1, max_shapes)
    slots = rng.sample(list(POSITIONS), n)
    shapes = rng.sample(list(SHAPES), n)
    colours = rng.sample(list(COLOURS), n)
    objects = []
    for slot, shape, colour in zip(slots, shapes, colours):
        size = rng.choice(list(SIZES))
        fx, fy = POSITIONS[slot]
        # Rounded so that the metadata written to scenes.json is exactly what was drawn.
        cx = round((fx + rng.uniform(-JITTER, JITTER)) * image_size, 3)
        cy = round((fy + rng.uniform(-JITTER, JITTER)) * image_size, 3)
        r = round(SIZES[size] * image_size, 3)
        objects.append(SceneObject(shape, colour, size, slot, cx, cy, r))
    return objects


def _shape_outline(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """Polygon of a non-circle shape centred on (cx, cy); all points within MAX_EXTENT * r."""
    if shape == "square":  # half side 0.8 r: corners at 1.13 r
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, circumradius 1.15 r around (cx, cy)
        R = MAX_EXTENT * r
        return [(cx + R * math.cos(a), cy + R * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # five points, outer radius 1.15 r, inner radius half of that
        R = MAX_EXTENT * r
        pts = []
        for k in range(10):
            rad = R if k % 2 == 0 else 0.5 * R
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":  # a plus sign: arms of length r from the centre, half width 0.35 r
        a, w = r, 0.35 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
                (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
                (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: Sequence[SceneObject], image_size: int = 64,
                 background: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Draw the objects on a plain background; returns an RGB image of image_size x image_size."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (image_size * s, image_size * s), background)
    draw = ImageDraw.Draw(big)
    for o in objects:
        fill = COLOURS[o.colour]
        cx, cy, r = o.cx * s, o.cy * s, o.r * s
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_outline(o.shape, cx, cy, r), fill=fill)
    return big.reduce(s)  # exact box average of s x s blocks


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(objects: Sequence[SceneObject]) -> str:
    """The stage-1 caption: 'A small blue square at the top left and a large red circle at the bottom right.'"""
    ordered = sorted(objects, key=lambda o: CAPTION_ORDER.index(o.position))
    parts = [f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}" for o in ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def make_question(qtype: str, objects: Sequence[SceneObject], rng: random.Random,
                  yes: Optional[bool] = None) -> Tuple[str, str]:
    """One question of type qtype about the scene and its single-word answer.

    For ``yesno`` the caller decides the answer through ``yes`` (to keep the classes balanced);
    otherwise the answer follows from the scene.
    """
    template = rng.choice(TEMPLATES[qtype])
    if qtype == "count":
        return template, str(len(objects))
    if qtype == "yesno":
        if yes is None:
            yes = rng.random() < 0.5
        by_cell = {o.position: o for o in objects}
        if "{colour}" in template:  # about the colour of an object in a named cell
            target = rng.choice(list(objects))
            others = [o.colour for o in objects if o is not target]
            if yes:
                colour = target.colour
            elif others and rng.random() < 0.5:
                colour = rng.choice(others)  # hard negative: the colour of another object here
            else:
                colour = rng.choice([c for c in COLOURS if c != target.colour])
            where, shape = target.position, target.shape
        else:  # is there a given shape in a named cell (the cell may be empty)
            if yes:
                target = rng.choice(list(objects))
                where, shape = target.position, target.shape
            else:
                where = rng.choice(list(POSITIONS))
                here = by_cell.get(where)
                others = [o.shape for o in objects if o is not here]
                if others and rng.random() < 0.5:
                    shape = rng.choice(others)  # hard negative: a shape that is in another cell
                else:
                    shape = rng.choice([x for x in SHAPES if here is None or x != here.shape])
            colour = None
        q = template.format(where=POSITION_PHRASES[where], colour=colour, shape=shape,
                            a=_article(shape))
        truth = (by_cell[where].colour == colour) if colour is not None else \
            (where in by_cell and by_cell[where].shape == shape)
        assert truth == yes
        return q, "yes" if yes else "no"
    target = rng.choice(list(objects))
    q = template.format(shape=target.shape, colour=target.colour,
                        where=POSITION_PHRASES[target.position], a=_article(target.colour))
    answer = {"colour": target.colour, "shape": target.shape, "position": target.position,
              "size": target.size}[qtype]
    return q, answer


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int, attempt: int = 0) -> random.Random:
    return random.Random(f"visualrwkv-synth:{seed}:{split}:{index}:{attempt}")


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _save_png(img: Image.Image, path: Path) -> None:
    # PNG without metadata: the bytes depend only on the pixels.
    img.save(path, format="PNG", optimize=False, compress_level=6)


_IMAGE_NAME = re.compile(r"^(train|test)_\d{6}\.png$")


def generate(out_dir: Union[str, os.PathLike], seed: int = 0, n_train_images: int = 2000,
             n_test_images: int = 200, image_size: int = 64, max_shapes: int = 3,
             max_turns: int = 3, progress: Optional[bool] = None) -> Dict[str, str]:
    """Write the synthetic dataset into out_dir (created if needed) and return its paths.

    n_train_images images each get one stage-1 caption record and one stage-2 record of 1 to
    max_turns question turns of different types. n_test_images held-out images each get one
    question of every type (so the test file has ``len(QUESTION_TYPES) * n_test_images``
    questions, exactly balanced over the types, yes/no exactly balanced too). Held-out images come
    from their own seed stream and are redrawn if their pixels equal a training (or earlier test)
    image. progress: show a tqdm bar (default: when there are at least 500 images).

    Returns a dict with keys out_dir, image_folder, stage1, stage2, test, test_answers, scenes,
    info (all str paths).
    """
    if image_size < 16:
        raise UserError(f"--image_size must be at least 16 pixels, got {image_size}")
    if n_train_images < 0 or n_test_images < 0:
        raise UserError("--n_train and --n_test must not be negative")
    if not 1 <= max_shapes <= len(POSITIONS):
        raise UserError(f"max_shapes must be between 1 and {len(POSITIONS)}, got {max_shapes}")
    if not 1 <= max_turns <= len(QUESTION_TYPES):
        raise UserError(f"max_turns must be between 1 and {len(QUESTION_TYPES)}, got {max_turns}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    total = n_train_images + n_test_images
    if progress is None:
        progress = total >= 500
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="synth images", unit="img", file=sys.stderr)

    scenes: Dict[str, dict] = {}
    written = set()
    train_pixels = set()
    stage1: List[dict] = []
    stage2: List[dict] = []
    n_yesno = 0  # alternates yes / no over the training yes/no questions

    for i in range(n_train_images):
        rng = _image_rng(seed, "train", i)
        objects = sample_scene(rng, image_size, max_shapes)
        img = render_scene(objects, image_size)
        name = f"train_{i:06d}.png"
        _save_png(img, images / name)
        written.add(name)
        train_pixels.add(hashlib.sha1(img.tobytes()).hexdigest())
        scenes[name] = {"split": "train", "objects": [asdict(o) for o in objects]}

        # Stage 1: one caption.
        stage1.append({
            "id": f"synth-train-{i:06d}-caption",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                {"from": "gpt", "value": describe(objects)},
            ],
            "type": "caption",
        })

        # Stage 2: 1..max_turns questions of different types; <image> in the first one only.
        types = rng.sample(list(QUESTION_TYPES), rng.randint(1, max_turns))
        conversations = []
        for t in types:
            yes = None
            if t == "yesno":
                yes = n_yesno % 2 == 0
                n_yesno += 1
            q, a = make_question(t, objects, rng, yes)
            prefix = "<image>\n" if not conversations else ""
            conversations += [{"from": "human", "value": f"{prefix}{q}\n{ANSWER_SUFFIX}"},
                              {"from": "gpt", "value": a}]
        stage2.append({
            "id": f"synth-train-{i:06d}-qa",
            "image": name,
            "conversations": conversations,
            "type": types[0] if len(types) == 1 else "multi",
            "types": types,
        })
        if bar is not None:
            bar.update(1)

    test_rows: List[dict] = []
    test_pixels = set()
    for j in range(n_test_images):
        # Redraw (next attempt of this image's stream) until the pixels are new.
        attempt = 0
        while True:
            rng = _image_rng(seed, "test", j, attempt)
            objects = sample_scene(rng, image_size, max_shapes)
            img = render_scene(objects, image_size)
            digest = hashlib.sha1(img.tobytes()).hexdigest()
            if digest not in train_pixels and digest not in test_pixels:
                break
            attempt += 1
        test_pixels.add(digest)
        name = f"test_{j:06d}.png"
        _save_png(img, images / name)
        written.add(name)
        scenes[name] = {"split": "test", "objects": [asdict(o) for o in objects]}
        for t in QUESTION_TYPES:
            q, a = make_question(t, objects, rng, yes=(j % 2 == 0) if t == "yesno" else None)
            test_rows.append({"question_id": len(test_rows), "image": name,
                              "text": f"{q}\n{ANSWER_SUFFIX}", "answer": a, "type": t,
                              "category": t})  # "category": the usual LLaVA eval field name
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # Remove images of an earlier, larger run into the same folder (only our own file names).
    for p in images.iterdir():
        if _IMAGE_NAME.match(p.name) and p.name not in written:
            p.unlink()

    paths = {
        "out_dir": out, "image_folder": images, "stage1": out / "stage1.json",
        "stage2": out / "stage2.json", "test": out / "test.jsonl",
        "test_answers": out / "test_answers.jsonl", "scenes": out / "scenes.json",
        "info": out / "info.json",
    }
    _write_json(paths["stage1"], stage1)
    _write_json(paths["stage2"], stage2)
    _write_jsonl(paths["test"], test_rows)
    _write_jsonl(paths["test_answers"],
                 ({"question_id": r["question_id"], "answer": r["answer"], "type": r["type"]}
                  for r in test_rows))
    _write_json(paths["scenes"], {"image_size": image_size, "background": list(BACKGROUND),
                                  "images": scenes})
    _write_json(paths["info"], {
        "generator": "visualrwkv.data.synth",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "max_shapes": max_shapes,
        "max_turns": max_turns,
        "n_train_images": n_train_images,
        "n_test_images": n_test_images,
        "n_stage2_turns": sum(len(r["types"]) for r in stage2),
        "n_test_questions": len(test_rows),
        "question_types": list(QUESTION_TYPES),
        "answer_space": {k: list(v) for k, v in answer_space(max_shapes).items()},
        "chance": chance_levels(test_rows) if test_rows else {},
        # Relative names only, so the file does not depend on where the data was written.
        "files": {k: str(v.relative_to(out)) for k, v in paths.items() if k != "out_dir"},
    })
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------------------
# Chance levels
# ----------------------------------------------------------------------------------------------


def _read_rows(test: Union[str, os.PathLike, Sequence[dict]]) -> List[dict]:
    if isinstance(test, (str, os.PathLike)):
        with open(test, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(test)


def chance_levels(test: Union[str, os.PathLike, Sequence[dict]]) -> Dict[str, Dict[str, float]]:
    """Chance accuracy per question type of a test file (test.jsonl / test_answers.jsonl or rows).

    For every type: ``majority`` = accuracy of always giving that type's most frequent answer,
    ``uniform`` = 1 / number of distinct answers of that type (guessing at random), ``n`` = number
    of questions, ``majority_answer``. Key ``"all"`` holds the question-weighted averages.
    """
    rows = _read_rows(test)
    by_type: Dict[str, Counter] = {}
    for r in rows:
        by_type.setdefault(r["type"], Counter())[str(r["answer"])] += 1
    result: Dict[str, Dict[str, float]] = {}
    for t in sorted(by_type, key=lambda t: (QUESTION_TYPES.index(t) if t in QUESTION_TYPES else 99, t)):
        counts = by_type[t]
        n = sum(counts.values())
        # Ties broken by the answer text so the result is deterministic.
        answer, top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        result[t] = {"n": n, "majority": top / n, "majority_answer": answer, "uniform": 1 / len(counts)}
    total = sum(v["n"] for v in result.values())
    if total:
        result["all"] = {
            "n": total,
            "majority": sum(v["majority"] * v["n"] for v in result.values()) / total,
            "uniform": sum(v["uniform"] * v["n"] for v in result.values()) / total,
        }
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

LAUNCH = "visualrwkv data synth --out DIR [--seed 0 --n_train 2000 --n_test 200 --image_size 64]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visualrwkv data synth",
        description="Write the built-in synthetic visual-question dataset (shapes, colours, sizes, "
                    "positions): stage-1 captions, stage-2 questions and a held-out test set.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "launch:\n"
            f"  {LAUNCH}\n"
            "  (or: python -m visualrwkv.data.synth --out DIR ...)\n\n"
            "writes DIR/images/*.png, DIR/stage1.json, DIR/stage2.json (LLaVA JSON; use\n"
            "--image_folder DIR/images), DIR/test.jsonl + DIR/test_answers.jsonl (LLaVA eval\n"
            "layout: question_id, image, text, answer, type, category), DIR/scenes.json, DIR/info.json."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole dataset (default 0)")
    p.add_argument("--n_train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--n_test", type=int, default=200,
                   help=f"held-out images, {len(QUESTION_TYPES)} questions each (default 200)")
    p.add_argument("--image_size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--max_shapes", type=int, default=3, help="most shapes per image, 1-4 (default 3)")
    p.add_argument("--max_turns", type=int, default=3,
                   help="most question turns per stage-2 record (default 3)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    paths = generate(args.out, seed=args.seed, n_train_images=args.n_train, n_test_images=args.n_test,
                     image_size=args.image_size, max_shapes=args.max_shapes, max_turns=args.max_turns,
                     progress=False if args.no_progress else None)
    print(f"wrote {args.n_train} training and {args.n_test} held-out images of {args.image_size}px to {paths['out_dir']}")
    for key in ("image_folder", "stage1", "stage2", "test", "test_answers", "scenes", "info"):
        print(f"  {key:<13} {paths[key]}")
    if args.n_test:
        print("chance accuracy on the test questions (majority answer / uniform guess):")
        for t, v in chance_levels(paths["test"]).items():
            print(f"  {t:<9} n={v['n']:<6} {100 * v['majority']:5.1f}% / {100 * v['uniform']:5.1f}%")
    print(f"train with: --data_file {paths['stage1']} (stage 1) or {paths['stage2']} (stage 2) "
          f"--image_folder {paths['image_folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
