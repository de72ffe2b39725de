"""The built-in synthetic dataset (visualrwkv.data.synth) and the tiny presets (visualrwkv.presets).

The answer checks below do not call the generator's question code: they re-read what was drawn
(scenes.json, and the pixels themselves) and work out every answer independently from the
question's words.
"""
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from visualrwkv.data import synth

N_TRAIN, N_TEST, SIZE = 150, 40, 64
WORDS = {
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
}
SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    paths = synth.generate(out, seed=3, n_train_images=N_TRAIN, n_test_images=N_TEST, image_size=SIZE)
    return paths


def _load(paths):
    stage1 = json.loads(Path(paths["stage1"]).read_text())
    stage2 = json.loads(Path(paths["stage2"]).read_text())
    test = [json.loads(line) for line in Path(paths["test"]).read_text().splitlines()]
    scenes = json.loads(Path(paths["scenes"]).read_text())["images"]
    return stage1, stage2, test, scenes


def _tree(folder):
    """relative path -> sha256 of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mentions(question, kind):
    return [w for w in WORDS[kind] if re.search(rf"\b{w}\b", question)]


def _expected_answer(qtype, question, objects):
    """The answer worked out from the drawn scene and the words of the question."""
    assert question.endswith(SUFFIX), question
    q = question[: -len(SUFFIX)].replace("<image>\n", "")
    colours, shapes, positions = _mentions(q, "colour"), _mentions(q, "shape"), _mentions(q, "position")
    if qtype == "count":
        return str(len(objects))
    if qtype == "yesno":
        # One cell and one attribute: its colour, or the shape in it (the cell may be empty).
        assert len(positions) == 1 and len(colours) + len(shapes) == 1, q
        here = [o for o in objects if o["position"] == positions[0]]
        if colours:
            assert len(here) == 1, q  # colour questions are about an object that is there
            hit = here[0]["colour"] == colours[0]
        else:
            hit = bool(here) and here[0]["shape"] == shapes[0]
        return "yes" if hit else "no"
    # Every other question names its object; exactly one object must fit what is named.
    assert colours or shapes or positions, q
    matches = [o for o in objects
               if all(o["colour"] == c for c in colours) and all(o["shape"] == s for s in shapes)
               and all(o["position"] == p for p in positions)]
    assert len(matches) == 1, (q, objects)
    # The question must not give its own answer away.
    if qtype in WORDS:
        assert not _mentions(q, qtype), q
    return matches[0][qtype]


def test_files_and_record_format(data):
    stage1, stage2, test, scenes = _load(data)
    assert len(stage1) == len(stage2) == N_TRAIN
    assert len(test) == N_TEST * len(synth.QUESTION_TYPES)
    images = Path(data["image_folder"])
    assert sorted(p.name for p in images.iterdir()) == sorted(scenes)
    for rec in stage1 + stage2:
        assert set(rec) >= {"id", "image", "conversations", "type"}
        conv = rec["conversations"]
        assert len(conv) % 2 == 0 and len(conv) >= 2
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        # <image> exactly once, at the start of the first human turn (SPEC §5 layout).
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert (images / rec["image"]).is_file()
    ids = [r["id"] for r in stage1 + stage2]
    assert len(set(ids)) == len(ids)
    for row in test:
        assert set(row) == {"question_id", "image", "text", "answer", "type", "category"}
        assert row["category"] == row["type"]
        assert "<image>" not in row["text"]
        assert re.fullmatch(r"[a-z0-9]+( [a-z]+)?", row["answer"]), row  # a word or two: exact match is meaningful
    assert [r["question_id"] for r in test] == list(range(len(test)))
    answers = [json.loads(line) for line in Path(data["test_answers"]).read_text().splitlines()]
    assert answers == [{"question_id": r["question_id"], "answer": r["answer"], "type": r["type"]} for r in test]
    with Image.open(images / test[0]["image"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_deterministic(data, tmp_path):
    again = synth.generate(tmp_path / "b", seed=3, n_train_images=N_TRAIN, n_test_images=N_TEST, image_size=SIZE)
    assert _tree(data["out_dir"]) == _tree(again["out_dir"])  # same names, same bytes
    assert _load(data) == _load(again)
    other = synth.generate(tmp_path / "c", seed=4, n_train_images=20, n_test_images=0, image_size=SIZE)
    assert Path(other["stage1"]).read_bytes() != Path(again["stage1"]).read_bytes()
    # Fewer images: the ones that remain are unchanged, stale ones are removed.
    fewer = synth.generate(tmp_path / "b", seed=3, n_train_images=10, n_test_images=0, image_size=SIZE)
    tree = _tree(fewer["image_folder"])
    assert sorted(tree) == [f"train_{i:06d}.png" for i in range(10)]
    assert all(tree[k] == v for k, v in _tree(data["image_folder"]).items() if k in tree)


def test_every_answer_matches_the_scene(data):
    stage1, stage2, test, scenes = _load(data)
    n = 0
    for rec in stage2:
        objects = scenes[rec["image"]]["objects"]
        conv = rec["conversations"]
        assert len(rec["types"]) == len(conv) // 2 == len(set(rec["types"]))
        for k, qtype in enumerate(rec["types"]):
            assert conv[2 * k + 1]["value"] == _expected_answer(qtype, conv[2 * k]["value"], objects)
            n += 1
    for row in test:
        assert row["answer"] == _expected_answer(row["type"], row["text"], scenes[row["image"]]["objects"])
        n += 1
    assert n >= N_TRAIN + N_TEST * len(synth.QUESTION_TYPES)
    phrase = {p: f"at the {p}" for p in WORDS["position"]}
    for rec in stage1:
        objects = scenes[rec["image"]]["objects"]
        caption = rec["conversations"][1]["value"].lower()
        for o in objects:
            assert f"a {o['size']} {o['colour']} {o['shape']} {phrase[o['position']]}" in caption
        assert caption.count(" a ") + caption.startswith("a ") == len(objects)


def _coverage(pixel, colour):
    """How much of a pixel a shape of this colour covers (images are box-averaged from 4x)."""
    bg = synth.BACKGROUND
    d = [c - b for c, b in zip(colour, bg)]
    return sum((p - b) * e for p, b, e in zip(pixel, bg, d)) / sum(e * e for e in d)


def test_pixels_match_the_scene(data):
    """The drawn pixels agree with scenes.json: colours, area of each shape, positions, no overlap."""
    scenes = json.loads(Path(data["scenes"]).read_text())["images"]
    # Areas of the outlines in units of r^2 (see the shape geometry in synth._shape_outline).
    R = synth.MAX_EXTENT
    area = {"circle": math.pi, "square": 1.6 ** 2, "triangle": 3 * math.sqrt(3) / 4 * R ** 2,
            "star": 5 * R * (R / 2) * math.sin(math.pi / 5), "cross": 2 * 2 * 0.7 - 0.7 ** 2}
    palette = {v: k for k, v in synth.COLOURS.items()}
    palette[synth.BACKGROUND] = "background"
    names = sorted(scenes)[:: max(1, len(scenes) // 60)]
    for name in names:
        objects = scenes[name]["objects"]
        with Image.open(Path(data["image_folder"]) / name) as im:
            img = im.convert("RGB")
        px = img.load()
        assert px[0, 0] == px[SIZE - 1, SIZE - 1] == synth.BACKGROUND
        # Fully covered pixels show exactly the palette colours of the objects (and the background).
        pure = {palette[c] for _, c in img.getcolors(SIZE * SIZE) if c in palette}
        assert pure == {"background"} | {o["colour"] for o in objects}
        for o in objects:
            assert px[int(o["cx"]), int(o["cy"])] == synth.COLOURS[o["colour"]]
            # Summed coverage around the centre = drawn area: checks the shape kind and the size.
            # Pixels whose centre is within MAX_EXTENT * r + 1 of the object's centre (the disc
            # that holds the shape, with a margin for edge pixels; it never reaches a neighbour's
            # fully covered pixels). PIL fills the pixels on a polygon's outline too, so small
            # polygons come out a few per cent larger than their exact area.
            reach = synth.MAX_EXTENT * o["r"] + 1
            drawn = sum(_coverage(px[x, y], synth.COLOURS[o["colour"]])
                        for x in range(SIZE) for y in range(SIZE)
                        if math.hypot(x + 0.5 - o["cx"], y + 0.5 - o["cy"]) <= reach)
            ratio = drawn / (area[o["shape"]] * o["r"] ** 2)
            assert 0.95 < ratio < 1.17, (name, o, ratio)
            assert o["r"] == pytest.approx(synth.SIZES[o["size"]] * SIZE, abs=1e-3)
            fx, fy = synth.POSITIONS[o["position"]]
            assert abs(o["cx"] / SIZE - fx) <= synth.JITTER + 1e-3 and abs(o["cy"] / SIZE - fy) <= synth.JITTER + 1e-3
            # The shape stays inside its cell of the 2 x 2 grid (one 32 px patch of the quickstart tower).
            x0, y0 = (fx - 0.25) * SIZE, (fy - 0.25) * SIZE
            reach_cell = synth.MAX_EXTENT * o["r"]
            assert x0 <= o["cx"] - reach_cell and o["cx"] + reach_cell <= x0 + SIZE / 2
            assert y0 <= o["cy"] - reach_cell and o["cy"] + reach_cell <= y0 + SIZE / 2
            cell_px = [(x, y) for x in range(SIZE) for y in range(SIZE)
                       if not (x0 <= x and x + 1 <= x0 + SIZE / 2 and y0 <= y and y + 1 <= y0 + SIZE / 2)
                       and math.hypot(x + 0.5 - o["cx"], y + 0.5 - o["cy"]) <= reach_cell]
            assert not cell_px, (name, o)
        # Distinct shapes, colours and slots; shapes never touch.
        for key in ("shape", "colour", "position"):
            assert len({o[key] for o in objects}) == len(objects)
        for a in objects:
            for b in objects:
                if a is not b:
                    d = math.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"])
                    assert d > synth.MAX_EXTENT * (a["r"] + b["r"])


def test_held_out_split_is_disjoint(data):
    stage1, stage2, test, scenes = _load(data)
    train = {r["image"] for r in stage1} | {r["image"] for r in stage2}
    held = {r["image"] for r in test}
    assert len(held) == N_TEST and not train & held
    folder = Path(data["image_folder"])

    def pixels(name):
        with Image.open(folder / name) as im:
            return hashlib.sha1(im.convert("RGB").tobytes()).hexdigest()

    train_px = {pixels(n) for n in train}
    held_px = [pixels(n) for n in held]
    assert len(set(held_px)) == len(held_px) and not train_px & set(held_px)


def test_held_out_images_are_redrawn_on_collision(tmp_path):
    """Tiny single-shape images collide often; the held-out split must still be disjoint."""

    def digest(img):
        return hashlib.sha1(img.convert("RGB").tobytes()).hexdigest()

    def first_draw(split, i):
        return digest(synth.render_scene(synth.sample_scene(synth._image_rng(0, split, i), 16, 1), 16))

    # Without the redraw, some held-out images would repeat training images (checks the check).
    naive_train = {first_draw("train", i) for i in range(300)}
    assert any(first_draw("test", j) in naive_train for j in range(100))
    paths = synth.generate(tmp_path, seed=0, n_train_images=300, n_test_images=100, image_size=16, max_shapes=1)
    folder = Path(paths["image_folder"])
    train, held = set(), []
    for p in sorted(folder.iterdir()):
        with Image.open(p) as im:
            (train.add if p.name.startswith("train_") else held.append)(digest(im))
    assert len(held) == 100 == len(set(held)) and not train & set(held)
    # Answers still follow the (redrawn) scenes.
    scenes = json.loads(Path(paths["scenes"]).read_text())["images"]
    for line in Path(paths["test"]).read_text().splitlines():
        row = json.loads(line)
        assert row["answer"] == _expected_answer(row["type"], row["text"], scenes[row["image"]]["objects"])


def test_question_type_and_answer_balance(data):
    stage1, stage2, test, scenes = _load(data)
    by_type = Counter(r["type"] for r in test)
    assert by_type == {t: N_TEST for t in synth.QUESTION_TYPES}
    yesno = Counter(r["answer"] for r in test if r["type"] == "yesno")
    assert yesno["yes"] == yesno["no"] == N_TEST // 2
    turns = Counter(t for r in stage2 for t in r["types"])
    assert set(turns) == set(synth.QUESTION_TYPES)
    mean = sum(turns.values()) / len(turns)
    assert all(0.6 * mean < c < 1.4 * mean for c in turns.values()), turns
    train_yesno = Counter(rec["conversations"][2 * k + 1]["value"]
                          for rec in stage2 for k, t in enumerate(rec["types"]) if t == "yesno")
    assert abs(train_yesno["yes"] - train_yesno["no"]) <= 1
    # No answer dominates its type.
    for t in synth.QUESTION_TYPES:
        answers = Counter(r["answer"] for r in test if r["type"] == t)
        assert max(answers.values()) <= 0.6 * N_TEST, (t, answers)


def test_chance_levels(data):
    chance = synth.chance_levels(data["test"])
    assert set(chance) == set(synth.QUESTION_TYPES) | {"all"}
    assert chance["yesno"]["majority"] == 0.5 and chance["yesno"]["uniform"] == 0.5
    assert chance["size"]["uniform"] == 0.5
    assert chance["position"]["uniform"] == pytest.approx(1 / 4)
    for t in synth.QUESTION_TYPES:
        assert chance[t]["n"] == N_TEST and chance[t]["uniform"] <= chance[t]["majority"] < 1
    assert chance["all"]["n"] == N_TEST * len(synth.QUESTION_TYPES)
    rows = [{"type": "count", "answer": "2"}] * 3 + [{"type": "count", "answer": "1"}]
    assert synth.chance_levels(rows)["count"] == {"n": 4, "majority": 0.75, "majority_answer": "2", "uniform": 0.5}
    assert synth.chance_levels(data["test_answers"]) == chance


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["--help"])
    assert e.value.code == 0
    assert "visualrwkv data synth --out DIR" in capsys.readouterr().out
    assert synth.main(["--out", str(tmp_path / "d"), "--n_train", "3", "--n_test", "2", "--image_size", "48",
                       "--seed", "7"]) == 0
    info = json.loads((tmp_path / "d" / "info.json").read_text())
    assert (info["seed"], info["n_train_images"], info["n_test_questions"], info["image_size"]) == (7, 3, 12, 48)
    with Image.open(tmp_path / "d" / "images" / "train_000000.png") as im:
        assert im.size == (48, 48)
    from visualrwkv.errors import UserError

    with pytest.raises(UserError):
        synth.generate(tmp_path / "e", image_size=8)


def test_tiny_vision_tower_offline(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import CLIPVisionModel

    from visualrwkv import presets

    folder = presets.make_tiny_vision_tower(tmp_path / "tower", image_size=32, patch_size=8, hidden_size=48,
                                            layers=2, heads=2, seed=1)
    assert {"config.json", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    model = CLIPVisionModel.from_pretrained(folder, local_files_only=True).eval()
    processor = presets.clip_image_processor_class().from_pretrained(folder, local_files_only=True)
    # Synthetic 64 px images: the processor resizes and centre-crops them to the tower's 32 px.
    images = [synth.render_scene(synth.sample_scene(synth._image_rng(0, "x", i), 64), 64) for i in range(3)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (3, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert tuple(out.shape) == (3, 1 + (32 // 8) ** 2, 48)
    assert torch.isfinite(out).all()
    # Same seed, same weights; the global torch random state is left alone.
    state = torch.random.get_rng_state()
    again = presets.make_tiny_vision_tower(tmp_path / "again", image_size=32, patch_size=8, hidden_size=48,
                                           layers=2, heads=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sd2 = CLIPVisionModel.from_pretrained(again, local_files_only=True).state_dict()
    assert all(torch.equal(v, sd2[k]) for k, v in model.state_dict().items())
    # The processor normalises with CLIP's mean and std: a white image maps to (1 - mean) / std.
    white = processor(images=[Image.new("RGB", (50, 40), (255, 255, 255))], return_tensors="pt")["pixel_values"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(presets.CLIP_MEAN, presets.CLIP_STD)])
    assert torch.allclose(white[0, :, 16, 16], expected, atol=1e-4)


def test_tiny_presets():
    from visualrwkv import presets

    t = presets.TINY_RWKV
    assert t["n_embd"] % t["head_size_a"] == 0 and t["head_size_a"] == 64
    assert t["dim_ffn"] == int(3.5 * t["n_embd"]) // 32 * 32
    assert t["vocab_size"] == 65536 and t["n_layer"] % 2 == 0


def test_tiny_clip_for_tests(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoImageProcessor, CLIPVisionModel

    from visualrwkv import presets

    folder = presets.make_tiny_clip_for_tests(tmp_path / "t")
    model = CLIPVisionModel.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    pixels = processor(images=[Image.new("RGB", (64, 64), (200, 10, 10))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert tuple(model(pixel_values=pixels).last_hidden_state.shape) == (1, 17, 32)
