"""``visualrwkv chat``: one-shot, interactive session with commands, and one-line errors."""
import io
import sys

import pytest
import torch

from visualrwkv import cli
from visualrwkv.generation import Pipeline, SamplingParams
from visualrwkv.generation.chat import EXAMPLE, ChatSession, interactive
from test_generation import example_image, tiny_model
from utils import make_tiny_tower, random_rwkv6




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny tower folder and a VisualRWKV checkpoint file saved with it."""
    d = tmp_path_factory.mktemp("chat")
    tower = make_tiny_tower(str(d / "tower"))
    ckpt = str(d / "tiny.pth")
    torch.save(tiny_model(tower).state_dict(), ckpt)
    return tower, ckpt


@pytest.fixture(scope="module")
def pipe(files):
    tower, ckpt = files
    return Pipeline.load(ckpt, tower, image_position="first", device="cpu")


def base_args(files):
    tower, ckpt = files
    return ["--model_path", ckpt, "--vision_tower_name", tower, "--image_position", "first", "--device", "cpu"]


def test_one_shot_prints_the_streamed_answer(files, pipe, capsys):
    img = example_image("bluejay.jpg")
    rc = cli.main(["chat", *base_args(files), "--image", img, "--prompt", "What bird is this?", "--greedy",
                   "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    want = pipe.ask(img, "What bird is this?", SamplingParams.greedy(8)).text
    assert rc == 0
    assert out == want + "\n"


def test_interactive_session_commands(files, pipe, tmp_path):
    img1, img2 = example_image("bluejay.jpg"), example_image("pizza.jpg")
    out = io.StringIO()
    session = ChatSession(pipe, SamplingParams.greedy(6), out=out)
    session.set_image(img1)
    script = "\n".join([
        "What is this?",
        "And the colour?",  # a second turn about the same image
        f"/image {tmp_path / 'missing.jpg'}",  # an error message, the session goes on
        f"/image {img2}",
        "What food?",
        "/reset",
        "/params",
        "/help",
        "/bogus",
        "/quit",
        "never read",
    ]) + "\n"
    rc = interactive(session, io.StringIO(script))
    text = out.getvalue()
    assert rc == 0
    assert text.count("Assistant: ") == 3
    assert "error: image not found" in text
    assert f"(image {img2} loaded; new conversation)" in text
    assert "(conversation cleared)" in text and "/noimage" in text and "unknown command /bogus" in text
    assert session.history == [] and session.image_name == img2
    # The second turn reused the first turn's state: its answer equals a fresh computation.
    fresh = Pipeline(pipe.model, pipe.image_processor, image_position="first", prefix_cache_size=0)
    first = fresh.ask(img1, "What is this?", SamplingParams.greedy(6)).text
    conv = [("human", "What is this?"), ("gpt", first), ("human", "And the colour?")] if first else \
        [("human", "And the colour?")]
    second = fresh.engine.generate([fresh.request(conv, img1, SamplingParams.greedy(6))])[0].text
    lines = [ln for ln in text.splitlines() if ln.startswith("User: Assistant: ")]
    assert lines[0] == "User: Assistant: " + first
    assert lines[1] == "User: Assistant: " + second


def test_end_of_input_leaves_cleanly(pipe):
    out = io.StringIO()
    assert interactive(ChatSession(pipe, SamplingParams.greedy(2), out=out), io.StringIO("")) == 0


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert EXAMPLE in out and "/image PATH" in out


def _one_line_error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_user_mistakes_are_one_line(files, capsys, tmp_path):
    tower, ckpt = files
    err = _one_line_error(capsys, ["chat", "--model_path", str(tmp_path / "nope.pth"), "--vision_tower_name", tower,
                                   "--prompt", "hi"])
    assert err == f"visualrwkv chat: error: model file not found: {tmp_path / 'nope.pth'}"
    rwkv_only = str(tmp_path / "rwkv.pth")
    torch.save(random_rwkv6(n_layer=1, n_embd=64).state_dict(), rwkv_only)
    err = _one_line_error(capsys, ["chat", "--model_path", rwkv_only, "--vision_tower_name", tower, "--prompt", "hi"])
    assert "not a VisualRWKV checkpoint" in err
    err = _one_line_error(capsys, ["chat", *base_args(files), "--image", str(tmp_path / "x.png"), "--prompt", "hi"])
    assert "image not found" in err
    err = _one_line_error(capsys, ["chat", *base_args(files), "--prompt", "hi", "--top_p", "0"])
    assert "top_p" in err
    if not torch.cuda.is_available():
        args = base_args(files)
        args[args.index("--device") + 1] = "cuda"
        err = _one_line_error(capsys, ["chat", *args, "--prompt", "hi"])
        assert "--device cuda was requested" in err


def test_compile_on_a_cpu_is_one_clear_error(files, capsys):
    tower, ckpt = files
    err = _one_line_error(capsys, ["chat", "--model_path", ckpt, "--vision_tower_name", tower, "--device", "cpu",
                                   "--compile", "1", "--image", example_image("bluejay.jpg"), "--prompt", "Hi"])
    assert "--compile 1 needs a CUDA GPU" in err
