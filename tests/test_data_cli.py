"""``visualrwkv data check`` / ``show`` / ``synth`` on the real sample and on planted defects."""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from visualrwkv.cli import main as cli_main
from visualrwkv.constants import IGNORE_INDEX
from visualrwkv.data.check import iter_bad_ids
from visualrwkv.data.conversation import tokenize_record
from visualrwkv.tokenizer import get_tokenizer

SAMPLE = "/work/shared/data/llava_sample"
DATA = os.path.join(SAMPLE, "dummy.json")
IMAGES = os.path.join(SAMPLE, "images")


def run(capsys, *argv):
    rc = cli_main(["data", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_check_real_sample(capsys, tmp_path, pos):
    bad = tmp_path / "bad.txt"
    rc, out, err = run(capsys, "check", "--data_file", DATA, "--image_folder", IMAGES, "--image_position", pos,
                       "--bad_ids_out", str(bad))
    assert rc == 0, out + err
    assert "records: 1000 (with image 1000, text-only 0)" in out
    assert "distinct image files checked: 10" in out
    assert "errors: 0  warnings: 0" in out and "no problems found" in out
    assert "tokens per sample, image expanded: min " in out
    assert bad.read_text() == ""
    assert not os.path.exists(DATA + ".bad_ids.txt")


def test_check_lengths_and_ctx_len(capsys, tmp_path):
    tok = get_tokenizer()
    recs = json.load(open(DATA))
    lengths = sorted(len(tokenize_record(r, tok, "first")[0]) - 1 + 577 for r in recs)
    bad = tmp_path / "bad.txt"
    rc, out, _ = run(capsys, "check", "--data_file", DATA, "--image_folder", IMAGES, "--image_position", "first",
                     "--ctx_len", "700", "--bad_ids_out", str(bad))
    assert f"min {lengths[0]} " in out and f"max {lengths[-1]}" in out
    n_over = sum(n > 700 for n in lengths)
    assert n_over > 0
    # Image first: the image always fits in 700, so long samples are only cut (warnings, rc 0).
    assert rc == 0
    lines = bad.read_text().splitlines()
    assert len(lines) == n_over and all("\twarning\ttoo_long_truncated\t" in l for l in lines)
    # Image last with a context that cannot hold the prompt plus the image: dropped -> errors.
    rc, out, _ = run(capsys, "check", "--data_file", DATA, "--image_folder", IMAGES, "--image_position", "last",
                     "--ctx_len", "700", "--bad_ids_out", str(bad), "--strict")
    assert rc == 1 and "too_long_dropped" in bad.read_text()
    # grid_size 0 = 1 image token: everything fits.
    rc, out, _ = run(capsys, "check", "--data_file", DATA, "--grid_size", "0", "--ctx_len", "700")
    assert rc == 0 and "image tokens: 1 " in out and "images not checked" in out


@pytest.fixture
def defects(tmp_path):
    """A JSONL copy of 12 good records plus planted defects, with a copy of the images."""
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    recs = json.load(open(DATA))[:12]
    for k, r in enumerate(recs):
        r["id"] = f"good-{k}"
    src = folder / recs[0]["image"]
    (src.parent / "half.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])

    def variant(rid, **kw):
        return dict(json.loads(json.dumps(recs[0])), id=rid, **kw)

    conv = recs[0]["conversations"]
    planted = [
        variant("missing-image", image="textvqa/train_images/does-not-exist.jpg"),
        variant("truncated-jpeg", image="textvqa/train_images/half.jpg"),
        variant("bad-role", conversations=[conv[0], {"from": "robot", "value": "beep"}]),
        variant("two-images", conversations=[conv[0], {"from": "gpt", "value": "see <image>"}]),
        variant("no-conversations", conversations=None),
        {"id": "turn-without-value", "conversations": [{"from": "human"}]},
        variant("empty-answer", conversations=[conv[0], {"from": "gpt", "value": "  "}]),
    ]
    lines = [json.dumps(r) for r in recs[:6] + planted + recs[6:]]
    lines.insert(3, '{"id": "broken-line", "conversations": [}')  # invalid JSON on line 4
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, folder


def test_check_reports_planted_defects(capsys, defects, tmp_path):
    data, folder = defects
    rc, out, err = run(capsys, "check", "--data_file", str(data), "--image_folder", str(folder), "--no_progress")
    assert rc == 1
    assert "Traceback" not in out + err
    bad_file = str(data) + ".bad_ids.txt"  # default: next to the data file
    assert f"bad record ids written to: {bad_file}" in out
    rows = [l.split("\t") for l in open(bad_file).read().splitlines()]
    by_kind = {}
    for rid, severity, kind, detail in rows:
        by_kind.setdefault(kind, []).append(rid)
    assert by_kind == {
        "invalid_json": ["broken-line"],
        "missing_image": ["missing-image"],
        "corrupt_image": ["truncated-jpeg"],
        "unknown_role": ["bad-role"],
        "multiple_images": ["two-images"],
        "malformed": ["no-conversations", "turn-without-value"],
        "empty_turn": ["empty-answer"],
    }
    assert not any(r.startswith("good-") for r in iter_bad_ids(bad_file))
    detail = {r[0]: r[3] for r in rows}
    assert "line 4" in detail["broken-line"]
    assert "robot" in detail["bad-role"]
    assert "does-not-exist.jpg" in detail["missing-image"]
    assert "truncated" in detail["truncated-jpeg"].lower() or "half.jpg" in detail["truncated-jpeg"]
    # Summary rows count each problem.
    assert "records: 20 (with image 15, text-only 0)" in out  # 19 parsed + 1 broken line
    for label in ("invalid JSON line", "image file missing", "image file corrupt / truncated",
                  "unknown role in 'from'", "several <image> in one record", "empty turn"):
        row = next(l for l in out.splitlines() if l.startswith(label))
        assert row.split()[len(label.split()) + 1] == "1", row
    assert "errors: 7  warnings: 1" in out


def test_check_bad_ids_flag_and_subprocess(defects, tmp_path):
    """The real command line: no traceback, exit code 1, ids file where asked."""
    data, folder = defects
    out_file = tmp_path / "custom" / "ids.txt"
    out_file.parent.mkdir()
    p = subprocess.run([sys.executable, "-m", "visualrwkv.cli", "data", "check", "--data_file", str(data),
                        "--image_folder", str(folder), "--bad_ids_out", str(out_file)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert "broken-line" in set(iter_bad_ids(out_file))


def test_check_unreadable_and_bad_flags(capsys, tmp_path):
    rc, out, err = run(capsys, "check", "--data_file", str(tmp_path / "nope.json"))
    assert rc == 1 and "cannot read data file" in out
    assert not (tmp_path / "nope.json.bad_ids.txt").exists()
    bin_file = tmp_path / "x.json"
    bin_file.write_text("[{]")
    rc, out, _ = run(capsys, "check", "--data_file", str(bin_file), "--bad_ids_out", str(tmp_path / "b.txt"))
    assert rc == 1 and "line 1" in out
    # Flag mistakes are one-line errors (exit 2), not tracebacks.
    assert cli_main(["data", "check", "--data_file", DATA, "--grid_size", "-5"]) == 2
    assert cli_main(["data", "check", "--data_file", DATA, "--image_folder", str(tmp_path / "none")]) == 2
    assert cli_main(["data", "check"]) == 2
    assert cli_main(["data", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--data_file" in err


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_show_json_real_sample(capsys, pos):
    tok = get_tokenizer()
    recs = json.load(open(DATA))
    rc, out, _ = run(capsys, "show", "--data_file", DATA, "--image_folder", IMAGES, "--image_position", pos,
                     "--limit", "4", "--json")
    assert rc == 0
    rows = [json.loads(l) for l in out.splitlines()]
    assert len(rows) == 4
    for k, row in enumerate(rows):
        ids, labels = tokenize_record(recs[k], tok, pos)
        assert row["id"] == recs[k]["id"] and row["input_ids"] == ids and row["labels"] == labels
        assert row["image_exists"] is True
        assert row["n_tokens_expanded"] == len(ids) - 1 + 577
        assert row["n_trained"] == sum(l != IGNORE_INDEX for l in labels)
        answer = recs[k]["conversations"][1]["value"].strip()
        assert row["trained_text"].endswith(f"Assistant:[[ {answer}\n\n]]")
        assert row["text"].count("<image>") == 1


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_show_text_real_sample(capsys, pos):
    rc, out, _ = run(capsys, "show", "--data_file", DATA, "--image_position", pos, "--id", "09efcb22ca121f57",
                     "--limit", "1")
    assert rc == 0
    assert out.startswith("=== 09efcb22ca121f57 (record #1)")
    assert "Assistant:[[ The time is now 10:22 according to this clock.\n\n]]" in out
    mask = out.split("--- loss mask (# trained, . not trained, I image)\n")[1].splitlines()[0]
    assert mask.count("I") == 1 and mask.endswith("#" * 13) and set(mask) == {".", "#", "I"}


def test_show_bad_records_do_not_crash(capsys, defects):
    data, folder = defects
    # The file has an invalid JSON line: show refuses with one line naming the line.
    assert cli_main(["data", "show", "--data_file", str(data)]) == 2
    assert "line 4" in capsys.readouterr().err
    lines = [l for l in data.read_text().splitlines() if "broken-line" not in l]
    data.write_text("\n".join(lines))
    rc, out, _ = run(capsys, "show", "--data_file", str(data), "--limit", "0", "--json")
    rows = [json.loads(l) for l in out.splitlines()]
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert rc == 0 and set(errors) == {"bad-role", "two-images", "no-conversations", "turn-without-value"}


@pytest.mark.parametrize("cmd, example", [
    ("check", "visualrwkv data check --data_file /data/llava_v1_5_mix665k.json --image_folder /data/images"),
    ("show", "visualrwkv data show --data_file /data/llava_v1_5_mix665k.json"),
])
def test_help_shows_launch_command(capsys, cmd, example):
    with pytest.raises(SystemExit) as e:
        cli_main(["data", cmd, "--help"])
    assert e.value.code == 0
    assert example in capsys.readouterr().out


def test_data_usage_and_synth_forwarding(capsys, monkeypatch):
    assert cli_main(["data", "--help"]) == 0
    assert "synth" in capsys.readouterr().out
    seen = []
    fake = types.ModuleType("visualrwkv.data.synth")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "visualrwkv.data.synth", fake)
    assert cli_main(["data", "synth", "--out", "x", "--n", "3"]) == 0
    assert seen == [["--out", "x", "--n", "3"]]
