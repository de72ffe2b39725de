"""LlavaDataset, truncation (SPEC §9), collate and file loading, on the real LLaVA sample."""
import json
import os
import shutil

import pytest
import torch

from visualrwkv.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.data.conversation import tokenize_record
from visualrwkv.data.dataset import LlavaDataset, collate, expanded_length, fit_to_context, load_records
from visualrwkv.errors import UserError
from visualrwkv.tokenizer import get_tokenizer

SAMPLE = "/work/shared/data/llava_sample"
DATA = os.path.join(SAMPLE, "dummy.json")
IMAGES = os.path.join(SAMPLE, "images")
N_IMG = 577


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def proc():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def records():
    return load_records(DATA)


def make(records, tok, proc, **kw):
    return LlavaDataset(records, IMAGES, tok, proc, **kw)


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_items_match_tokenizer_and_images(records, tok, proc, pos):
    ds = make(records[:12], tok, proc, image_position=pos)
    assert len(ds) == 12
    for i in (0, 5, 11):
        item = ds[i]
        ids, labels = tokenize_record(records[i], tok, pos)
        assert item["id"] == records[i]["id"]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ids
        assert item["labels"].dtype == torch.long and item["labels"].tolist() == labels
        assert int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1
        pv = item["pixel_values"]
        assert pv.shape == (3, 32, 32) and pv.dtype == torch.float32
        # CLIP normalisation gives values around 0, well outside [0, 1].
        assert pv.min() < 0
    assert ds.stats == {"n_records": 12, "n_truncated": 0, "n_dropped": 0, "n_skipped": 0}


def test_pixels_are_the_processor_output(records, tok, proc):
    from PIL import Image

    ds = make(records[:1], tok, proc)
    img = Image.open(os.path.join(IMAGES, records[0]["image"])).convert("RGB")
    expected = proc(images=img, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ds[0]["pixel_values"], expected)


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_truncation_keeps_image_and_cuts_text_after_it(records, tok, proc, pos):
    rec = records[0]
    ids, labels = tokenize_record(rec, tok, pos)
    full = expanded_length(ids, N_IMG)
    assert full == len(ids) - 1 + N_IMG
    p = ids.index(IMAGE_TOKEN_INDEX)
    end_of_image = p + N_IMG  # expanded length of everything up to and including the image

    # Exactly fits: untouched.
    ds = make([rec], tok, proc, image_position=pos, ctx_len=full)
    assert ds[0]["input_ids"].tolist() == ids and ds.stats["n_truncated"] == 0

    # One short: the last id goes.
    ds = make([rec], tok, proc, image_position=pos, ctx_len=full - 1)
    assert ds[0]["input_ids"].tolist() == ids[:-1] and ds[0]["labels"].tolist() == labels[:-1]
    assert ds.stats["n_truncated"] == 1

    # Only the image and 2 tokens after it fit: the cut is right after those.
    ctx = end_of_image + 2
    if ctx < full:
        ds = make([rec], tok, proc, image_position=pos, ctx_len=ctx)
        item = ds[0]
        assert item["input_ids"].tolist() == ids[:p + 3]
        assert expanded_length(item["input_ids"].tolist(), N_IMG) == ctx
        assert ds.stats == {"n_records": 1, "n_truncated": 1, "n_dropped": 0, "n_skipped": 0}

    # The image ends exactly at ctx_len: kept, cut right after the image.
    ds = make([rec], tok, proc, image_position=pos, ctx_len=end_of_image)
    item = ds[0]
    if end_of_image < full:
        assert item["input_ids"].tolist() == ids[:p + 1] and item["input_ids"][-1] == IMAGE_TOKEN_INDEX

    # One token less and the image would be cut: the sample is dropped, never cut into the image.
    ds = make([rec], tok, proc, image_position=pos, ctx_len=end_of_image - 1)
    assert ds[0] is None
    assert ds.stats == {"n_records": 1, "n_truncated": 0, "n_dropped": 1, "n_skipped": 0}


def test_truncation_positions_differ(records, tok):
    """With image position last, the image is late; with first it is at id 3 (the policy is per layout)."""
    rec = records[0]
    first = tokenize_record(rec, tok, "first")[0].index(IMAGE_TOKEN_INDEX)
    last = tokenize_record(rec, tok, "last")[0].index(IMAGE_TOKEN_INDEX)
    assert first == 3 and last > 100
    ids, labels = tokenize_record(rec, tok, "last")
    assert fit_to_context(ids, labels, first + N_IMG + 5, N_IMG)[2] == "dropped"
    assert fit_to_context(ids, labels, last + N_IMG, N_IMG)[2] == "truncated"


def test_text_only_records(tok, proc):
    recs = [{"id": "t0", "conversations": [{"from": "human", "value": "Hello " * 30},
                                           {"from": "gpt", "value": "Hi " * 30}]},
            {"id": "t1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    ds = LlavaDataset(recs, None, tok, None, ctx_len=40)  # no images: folder and processor not needed
    a, b = ds[0], ds[1]
    assert a["pixel_values"] is None and b["pixel_values"] is None
    assert len(a["input_ids"]) == 40  # cut at ctx_len exactly (no image to expand)
    assert a["input_ids"].tolist() == tokenize_record(recs[0], tok)[0][:40]
    assert b["input_ids"].tolist() == tokenize_record(recs[1], tok)[0]
    assert ds.stats["n_truncated"] == 1
    # Reading again (a second epoch) does not count twice.
    ds[0]
    assert ds.stats["n_truncated"] == 1


def test_collate(records, tok, proc):
    text = {"id": "txt", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    ds = make([records[1], text, records[0]], tok, proc)
    items = [ds[0], ds[1], ds[2]]
    batch = collate(items)
    lens = [len(it["input_ids"]) for it in items]
    B, T = batch["input_ids"].shape
    assert (B, T) == (3, max(lens))  # padded only to the longest sample
    assert batch["labels"].shape == (3, T)
    assert batch["lengths"].tolist() == lens
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["ids"] == [records[1]["id"], "txt", records[0]["id"]]
    # Images of the samples that have one, in sample order.
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], items[0]["pixel_values"])
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])
    for b, it in enumerate(items):
        n = lens[b]
        assert torch.equal(batch["input_ids"][b, :n], it["input_ids"])
        assert torch.equal(batch["labels"][b, :n], it["labels"])
        assert (batch["input_ids"][b, n:] == 0).all()  # right padding with 0
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
    # Dropped samples (None) are left out; a batch with nothing left is None.
    assert collate([None, items[1]])["ids"] == ["txt"]
    assert collate([None]) is None
    # Text-only batch: no pixel tensor.
    assert collate([items[1]])["pixel_values"] is None


def test_dataloader_workers_share_counters(records, tok, proc):
    ds = make(records[:8], tok, proc, image_position="last", ctx_len=700)
    n_expected = sum(expanded_length(tokenize_record(r, tok, "last")[0], N_IMG) > 700 for r in records[:8])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = [b for b in loader if b is not None]
    assert sum(len(b["ids"]) for b in batches) + ds.stats["n_dropped"] == 8
    assert ds.stats["n_truncated"] + ds.stats["n_dropped"] == n_expected > 0
    for b in batches:
        assert (b["input_ids"] == IMAGE_TOKEN_INDEX).sum() == b["has_image"].sum()


def test_several_images_rejected_or_skipped(records, tok, proc):
    bad = json.loads(json.dumps(records[0]))
    bad["id"] = "two-images"
    bad["conversations"][1]["value"] += " <image>"
    with pytest.raises(UserError, match="two-images"):
        make([records[1], bad], tok, proc)
    ds = make([records[1], bad, records[2]], tok, proc, on_bad_record="skip")
    assert len(ds) == 2 and [ds[0]["id"], ds[1]["id"]] == [records[1]["id"], records[2]["id"]]
    assert ds.stats["n_skipped"] == 1 and ds.skipped[0][0] == "two-images"


def test_missing_and_corrupt_images(records, tok, proc, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    src = folder / records[0]["image"]
    broken = src.parent / "broken.jpg"
    broken.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # a truncated JPEG
    missing = dict(records[0], id="no-file", image="textvqa/train_images/nope.jpg")
    corrupt = dict(records[0], id="half-jpeg", image="textvqa/train_images/broken.jpg")

    with pytest.raises(UserError, match="no-file"):  # checked up front
        LlavaDataset([records[1], missing], folder, tok, proc)
    ds = LlavaDataset([records[1], missing, corrupt], folder, tok, proc, on_bad_record="skip")
    assert len(ds) == 2 and ds.stats["n_skipped"] == 1
    assert ds[1] is None  # the corrupt file is found when read
    assert ds.stats["n_skipped"] == 2
    ds = LlavaDataset([corrupt], folder, tok, proc)
    with pytest.raises(UserError, match="half-jpeg"):
        ds[0]


def test_bad_arguments(records, tok, proc):
    with pytest.raises(UserError, match="image_position"):
        make(records[:1], tok, proc, image_position="centre")
    with pytest.raises(UserError, match="on_bad_record"):
        make(records[:1], tok, proc, on_bad_record="ignore")
    with pytest.raises(UserError, match="image folder"):
        LlavaDataset(records[:1], None, tok, proc)


def test_load_records_json_and_jsonl(records, tok, proc, tmp_path):
    assert len(records) == 1000 and records[0]["id"] == "011e7e629fb9ae7b"
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n")
    assert load_records(jl) == records[:3]
    ds_path = LlavaDataset(str(jl), IMAGES, tok, proc)
    assert ds_path.source == str(jl) and len(ds_path) == 3 and ds_path[2]["id"] == records[2]["id"]

    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in records[:4]]
    lines[2] = lines[2][:-5]  # cut the end of line 3
    bad.write_text("\n".join(lines))
    with pytest.raises(UserError, match=r"bad\.jsonl: line 3"):
        load_records(bad)

    broken_list = tmp_path / "broken.json"
    broken_list.write_text("[\n" + json.dumps(records[0]) + ",\n{oops}\n]")
    with pytest.raises(UserError, match=r"broken\.json: line 3"):
        load_records(broken_list)
    with pytest.raises(UserError, match="cannot read"):
        load_records(tmp_path / "missing.json")
    not_list = tmp_path / "n.json"
    not_list.write_text('"hello"')
    with pytest.raises(UserError, match="JSON list"):
        load_records(not_list)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"[\xff\xfe]")
    with pytest.raises(UserError, match="UTF-8"):
        load_records(binary)
