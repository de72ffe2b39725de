"""``visualrwkv eval`` (batched benchmark answering) and the lmms-eval plugin, on a tiny random
model saved as a checkpoint: one answer per question for each question-file layout, equal to
answering one by one; resuming after a crash or a --limit run; chunking and merging; scoring the
answers; one-line errors.

Fixtures (tests/fixtures/eval_run): questions.jsonl (custom benchmark with answers, shared images,
one text-only question), questions.json (LLaVA conversation layout, ScienceQA style), mmbench.tsv
(base64 images; 3 + 2 options -> 5 circular variants), images/*.png.
"""
import json
import os
import sys
import types

import pytest
import torch

from visualrwkv import cli
from visualrwkv.errors import UserError
from visualrwkv.eval import run
from visualrwkv.eval.questions import circular_questions, load_questions
from visualrwkv.generation import Pipeline, SamplingParams
from test_generation import tiny_model
from utils import make_tiny_tower, random_rwkv6

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval_run")
IMAGES = os.path.join(FIX, "images")
JSONL = os.path.join(FIX, "questions.jsonl")
JSON = os.path.join(FIX, "questions.json")
TSV = os.path.join(FIX, "mmbench.tsv")
MAX_NEW = 6




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny tower folder and a VisualRWKV checkpoint saved with it."""
    d = tmp_path_factory.mktemp("evalrun")
    tower = make_tiny_tower(str(d / "tower"))
    ckpt = str(d / "tiny-eval.pth")
    torch.save(tiny_model(tower).state_dict(), ckpt)
    return tower, ckpt


@pytest.fixture(scope="module")
def pipe(files):
    """The reference: the same checkpoint answering one question at a time, no prefix cache."""
    tower, ckpt = files
    return Pipeline.load(ckpt, tower, image_position="middle", device="cpu", prefix_cache_size=0)


def eval_args(files, question_file, out, benchmark="custom", *extra):
    tower, ckpt = files
    return ["eval", "--model_path", ckpt, "--vision_tower_name", tower, "--benchmark", benchmark,
            "--question_file", question_file, "--image_folder", IMAGES, "--output_file", str(out),
            "--device", "cpu", "--max_new_tokens", str(MAX_NEW), "--batch_size", "3", "--no_progress",
            "--num_workers", "1", *extra]


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def keys(records, benchmark="custom"):
    return [run.record_key(r, benchmark) for r in records]


def questions_of(path, benchmark):
    qs = load_questions(path, benchmark)
    return circular_questions(qs) if benchmark == "mmbench" else qs


# ------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("path,benchmark", [(JSONL, "custom"), (JSON, "scienceqa"), (TSV, "mmbench")],
                         ids=["jsonl", "json", "tsv"])
def test_one_answer_per_question_equal_to_one_by_one(files, pipe, tmp_path, capsys, path, benchmark):
    out = tmp_path / "answers.jsonl"
    rc, stdout, err = run_cli(capsys, *eval_args(files, path, out, benchmark))
    assert rc == 0, err
    qs = questions_of(path, benchmark)
    answers = read(out)
    # Exactly one answer per question.
    assert sorted(keys(answers, benchmark)) == sorted(run.question_key(q, benchmark) for q in qs)
    assert len(answers) == len(qs) == {"custom": 7, "scienceqa": 3, "mmbench": 5}[benchmark]
    assert f"answered {len(qs)} questions" in stdout
    by_id = {str(q.id): q for q in qs}
    for a in answers:
        q = by_id[str(a["question_id"])]
        assert a["prompt"] == q.prompt and a["model_id"] == "tiny-eval"
        assert 0.0 < a["mean_prob"] <= 1.0
        assert a.get("category") == q.category
        assert "round_id" not in a  # MMBench rotations carry their round in the id
        # Batched, image-grouped decoding gives the answer of asking this question alone.
        image = q.load_image(IMAGES) if q.image is not None else None
        alone = pipe.ask(image, q.prompt, SamplingParams.greedy(MAX_NEW))
        assert a["text"] == alone.text
        assert a["mean_prob"] == pytest.approx(alone.mean_prob, rel=1e-3, abs=1e-6)
    if benchmark == "mmbench":
        assert sorted(a["question_id"] for a in answers) == [0, 1, 1000000, 1000001, 2000000]
    if benchmark == "custom":
        assert any("image" not in a for a in answers)  # the text-only question was answered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_eval_compiled_answers_as_one_by_one(files, pipe, tmp_path, capsys):
    """eval on a GPU in fp32 through the prefill/tower graphs, plain and with --compile 1 (the
    compiled decoding step): the same answers as asking one question at a time on the CPU."""
    qs = questions_of(JSONL, "custom")
    for compile_flag in ("0", "1"):
        out = tmp_path / f"answers{compile_flag}.jsonl"
        argv = eval_args(files, JSONL, out, "custom")
        argv[argv.index("--device") + 1] = "cuda"
        rc, _, err = run_cli(capsys, *argv, "--dtype", "fp32", "--compile", compile_flag)
        assert rc == 0, err
        by_id = {str(a["question_id"]): a for a in read(out)}
        assert len(by_id) == len(qs)
        for q in qs:
            image = q.load_image(IMAGES) if q.image is not None else None
            assert by_id[str(q.id)]["text"] == pipe.ask(image, q.prompt, SamplingParams.greedy(MAX_NEW)).text


def test_each_image_goes_through_the_tower_once(files):
    tower, ckpt = files
    pipe = Pipeline.load(ckpt, tower, image_position="first", device="cpu", prefix_cache_size=8)
    qs = load_questions(JSONL, "custom")
    jobs = run.group_by_image([run.Job(q, q.prompt, q.image, SamplingParams.greedy(2)) for q in qs])
    # Questions about one image are asked one after the other.
    assert [j.tag.id for j in jobs] == [1, 2, 3, 6, 4, 5, 7]
    for batch_size in (8, 1):
        pipe.engine.cache.clear()
        stats = {}
        got = {job.tag.id: res for job, res in run.answer_jobs(pipe, jobs, batch_size=batch_size,
                                                                image_folder=IMAGES, num_workers=2, stats=stats)}
        assert sorted(got) == [1, 2, 3, 4, 5, 6, 7]
        assert stats["tower_images"] == 3  # red, blue, green
    # With the image first and one question at a time, the second question about an image starts
    # from the stored state after "User: <image>" (questions 2 and 6).
    assert got[1].cached_tokens == 0 and got[2].cached_tokens > 0 and got[6].cached_tokens > 0
    assert stats["cached_tokens"] == got[2].cached_tokens + got[6].cached_tokens + got[7].cached_tokens


# ------------------------------------------------------------------------------------- resuming
def test_resume_after_a_crash_mid_line(files, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert run_cli(capsys, *eval_args(files, JSONL, full))[0] == 0
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    # A crash after 3 answers, in the middle of writing the 4th.
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")
    rc, _, err = run_cli(capsys, *eval_args(files, JSONL, crashed))
    assert rc == 0
    assert "3 of 7 questions" in err and "answering the other 4" in err
    answers = read(crashed)  # every line parses: the half line was cut off
    assert len(answers) == 7 and len(set(keys(answers))) == 7
    assert crashed.read_text(encoding="utf-8").startswith("".join(lines[:3]))
    assert {r["question_id"]: r["text"] for r in answers} == {r["question_id"]: r["text"] for r in read(full)}
    # A third run finds everything answered.
    rc, out, _ = run_cli(capsys, *eval_args(files, JSONL, crashed))
    assert rc == 0 and "all 7 questions" in out and len(read(crashed)) == 7


def test_resume_after_a_limited_run(files, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert run_cli(capsys, *eval_args(files, JSONL, out, "custom", "--limit", "3"))[0] == 0
    first = read(out)
    assert sorted(r["question_id"] for r in first) == [1, 2, 3]
    assert run_cli(capsys, *eval_args(files, JSONL, out))[0] == 0
    answers = read(out)
    assert sorted(r["question_id"] for r in answers) == [1, 2, 3, 4, 5, 6, 7]
    assert answers[:3] == first


def test_answers_of_another_model_are_not_mixed_in(files, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    out.write_text(json.dumps({"question_id": 1, "prompt": "p", "text": "x", "model_id": "other"}) + "\n")
    rc, _, err = run_cli(capsys, *eval_args(files, JSONL, out, "custom", "--limit", "1"))
    assert rc == 2 and "holds answers of model 'other'" in err and "Traceback" not in err
    rc, _, _ = run_cli(capsys, *eval_args(files, JSONL, out, "custom", "--limit", "1", "--overwrite"))
    assert rc == 0 and [r["model_id"] for r in read(out)] == ["tiny-eval"]


def test_read_answer_file_recovery(tmp_path):
    good = [{"question_id": i, "prompt": "p", "text": str(i), "model_id": "m"} for i in range(3)]
    path = tmp_path / "a.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in good)
    # A complete last record without its newline is kept (and the newline added on repair).
    path.write_text(body.rstrip("\n"))
    assert run.read_answer_file(str(path), repair=True) == good
    assert path.read_text() == body
    # A damaged last line is dropped and cut off on repair.
    path.write_text(body + '{"question_id": 3, "te\n')
    assert run.read_answer_file(str(path), repair=True) == good and path.read_text() == body
    # A damaged line in the middle is the user's to fix.
    path.write_text(body + "garbage\n" + json.dumps(good[0]) + "\n")
    with pytest.raises(UserError, match=r"a.jsonl:4: not an answer record"):
        run.read_answer_file(str(path))


# ------------------------------------------------------------------------------------- chunks
def test_get_chunk_partitions():
    items = list(range(10))
    for n in (1, 3, 4, 10, 12):
        chunks = [run.get_chunk(items, n, k) for k in range(n)]
        assert sum(chunks, []) == items
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_chunks_split_and_merge_to_the_full_set(files, tmp_path, capsys):
    parts = []
    for k in range(3):
        part = tmp_path / f"3_{k}.jsonl"
        argv = eval_args(files, JSONL, part, "custom", "--num_chunks", "3", "--chunk_idx", str(k))
        assert run_cli(capsys, *argv)[0] == 0
        parts.append(part)
    ids = [sorted(r["question_id"] for r in read(p)) for p in parts]
    assert ids == [[1, 2], [3, 4], [5, 6, 7]]  # contiguous chunks of the file's order
    # A duplicate (a chunk run twice by mistake, concatenated) is dropped by the merge.
    with open(parts[0], "a", encoding="utf-8") as f:
        f.write(json.dumps(read(parts[0])[0]) + "\n")
    merged = tmp_path / "merged.jsonl"
    rc, out, err = run_cli(capsys, "eval", "--merge", *map(str, parts), "--output_file", str(merged),
                           "--question_file", JSONL)
    assert rc == 0, err
    assert "7 answers" in out and "1 duplicates dropped" in out and "all 7 questions are answered" in out
    answers = read(merged)
    assert [r["question_id"] for r in answers] == [1, 2, 3, 4, 5, 6, 7]  # question order
    # The chunked answers are the answers of one run over all questions.
    single = tmp_path / "single.jsonl"
    assert run_cli(capsys, *eval_args(files, JSONL, single))[0] == 0
    assert {r["question_id"]: r["text"] for r in answers} == {r["question_id"]: r["text"] for r in read(single)}


# ------------------------------------------------------------------------------------- scoring
def test_score_runs_on_the_produced_answers(files, tmp_path, capsys):
    out = tmp_path / "custom.jsonl"
    assert run_cli(capsys, *eval_args(files, JSONL, out))[0] == 0
    result = tmp_path / "score.json"
    rc, stdout, err = run_cli(capsys, "score", "--benchmark", "custom", "--answers", str(out),
                              "--question_file", JSONL, "--output", str(result))
    assert rc == 0, err
    res = json.loads(result.read_text())
    assert res["model_id"] == "tiny-eval"
    assert 0.0 <= res["metrics"][res["headline"]] <= 100.0

    mmb = tmp_path / "mmbench.jsonl"
    assert run_cli(capsys, *eval_args(files, TSV, mmb, "mmbench"))[0] == 0
    result = tmp_path / "mmb.json"
    rc, _, err = run_cli(capsys, "score", "--benchmark", "mmbench", "--answers", str(mmb), "--question_file", TSV,
                         "--output", str(result))
    assert rc == 0, err
    res = json.loads(result.read_text())
    assert res["metrics"]["questions"] == 2 and res["metrics"]["answers"] == 5  # every rotation was asked
    assert not any("not asked in all their rotations" in n for n in res["notes"])


# ------------------------------------------------------------------------------------- errors
def test_errors_are_one_clear_line(files, tmp_path, capsys):
    tower, ckpt = files
    out = tmp_path / "a.jsonl"
    rwkv_only = tmp_path / "rwkv.pth"
    torch.save(random_rwkv6(n_layer=1, n_embd=64).state_dict(), rwkv_only)
    no_images = tmp_path / "empty"
    no_images.mkdir()
    cases = [
        (eval_args(files, str(tmp_path / "nope.jsonl"), out), "question file"),
        ([*eval_args(files, JSONL, out), "--image_folder", str(no_images)], "3 of 3 images are not in"),
        ([*eval_args(files, JSONL, out), "--image_folder", str(tmp_path / "missing")], "image folder"),
        ([a for a in eval_args(files, JSONL, out) if a not in ("--image_folder", IMAGES)], "pass --image_folder"),
        ([*eval_args(files, JSONL, out), "--model_path", str(rwkv_only)], "not a VisualRWKV checkpoint"),
        ([*eval_args(files, JSONL, out), "--model_path", str(tmp_path / "none.pth")], "model file not found"),
        ([*eval_args(files, JSONL, out), "--num_chunks", "2", "--chunk_idx", "2"], "--chunk_idx must be in 0..1"),
        (["eval", "--question_file", JSONL, "--output_file", str(out)],
         "--model_path, --vision_tower_name are required"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*eval_args(files, JSONL, out), "--device", "cuda"], "--device cuda was requested"))
    for argv, message in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing was answered, no file was made


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "visualrwkv eval --model_path" in text and "--merge" in text and "--num_chunks 8 --chunk_idx $K" in text


# ------------------------------------------------------------------------------------- lmms-eval
class FakeInstance:
    """The two things the plugin reads from lmms-eval's Instance: request_type and args."""

    def __init__(self, request_type, args):
        self.request_type = request_type
        self.args = args


def _doc_images(doc):
    from PIL import Image

    return [Image.open(os.path.join(IMAGES, doc["image"])).convert("RGB")] if doc.get("image") else []


@pytest.fixture(scope="module")
def lmms_model(files, pipe):
    from visualrwkv.eval.lmms_plugin import VisualRWKVLmms

    tower, ckpt = files
    model = VisualRWKVLmms(model_path=ckpt, vision_tower_name=tower, device="cpu", batch_size="2",
                           max_new_tokens=str(MAX_NEW))
    model.task_dict = {"toy": {"test": [{"image": "red.png"}, {"image": "blue.png"}, {}]}}
    return model


def test_lmms_generate_until(lmms_model, pipe):
    greedy = {"until": ["\n\n"], "max_new_tokens": MAX_NEW, "temperature": 0, "do_sample": False}
    reqs = [FakeInstance("generate_until", ("What color is the square?", dict(greedy), _doc_images, 0, "toy", "test")),
            FakeInstance("generate_until", ("<image>\nWhat is shown?", dict(greedy), _doc_images, 1, "toy", "test")),
            FakeInstance("generate_until", ("Say hello.", {"max_new_tokens": 3}, _doc_images, 2, "toy", "test"))]
    got = lmms_model.generate_until(reqs)
    want = [pipe.ask(_doc_images({"image": "red.png"})[0], "What color is the square?", SamplingParams.greedy(MAX_NEW)),
            pipe.ask(_doc_images({"image": "blue.png"})[0], "What is shown?", SamplingParams.greedy(MAX_NEW)),
            pipe.ask(None, "Say hello.", SamplingParams.greedy(3))]
    assert got == [w.text for w in want]
    # `until` strings stop the answer: cut at the first character of the greedy answer.
    first = want[0].text.strip()[:1]
    if first:
        stop_at_first = {"until": [first], "max_new_tokens": MAX_NEW}
        cut = lmms_model.generate_until([FakeInstance("generate_until", (
            "What color is the square?", stop_at_first, _doc_images, 0, "toy", "test"))])
        assert cut == [want[0].text[:want[0].text.index(first)].strip()]
    with pytest.raises(NotImplementedError, match="single-round"):
        lmms_model.generate_until_multi_round(reqs)


def test_lmms_loglikelihood_equals_a_full_forward(lmms_model, pipe):
    from visualrwkv.eval.lmms_plugin import continuation_logprob

    model, tok = pipe.model, pipe.tokenizer
    reqs = [FakeInstance("loglikelihood", ("What color is the square?", "red", _doc_images, 0, "toy", "test")),
            FakeInstance("loglikelihood", ("What color is the square?", " blue box", _doc_images, 0, "toy", "test")),
            FakeInstance("loglikelihood", ("Say hello.", lambda doc: "hello there", _doc_images, 2, "toy", "test"))]
    got = lmms_model.loglikelihood(reqs)
    for (context, target, _, doc_id, _, _), (lp, greedy) in zip([r.args for r in reqs], got):
        target = target if isinstance(target, str) else target({})
        images = _doc_images(lmms_model.task_dict["toy"]["test"][doc_id])
        emb = pipe.embed_image(images[0])[0] if images else None
        ids = pipe.prompt_ids([("human", context)], has_image=emb is not None)
        cont = tok.encode(" " + target.strip())
        # Independent: one forward over prompt + continuation, log-softmax at each continuation position.
        with torch.no_grad():
            out = model(torch.tensor([ids + cont]), image_embeds=None if emb is None else emb.unsqueeze(0),
                        return_logits=True)
        logits = out.logits[0, -len(cont) - 1:-1].float()
        logp = logits.log_softmax(-1).gather(1, torch.tensor(cont).unsqueeze(1)).sum().item()
        assert lp == pytest.approx(logp, rel=1e-4, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    # The model's own greedy tokens are greedy.
    ids = pipe.prompt_ids([("human", "Say hello.")], has_image=False)
    res = pipe.engine.generate_one(ids, params=SamplingParams.greedy(4))
    logits0, state = model.prefill([ids])
    assert continuation_logprob(model, logits0, state, res.token_ids[:3])[1] is True


def test_lmms_plugin_without_lmms_eval(monkeypatch):
    from visualrwkv.eval import lmms_plugin

    assert lmms_plugin.HAVE_LMMS_EVAL is ("lmms_eval" in sys.modules)
    with pytest.raises(UserError, match="model_path"):
        lmms_plugin.VisualRWKVLmms()
    # Recent lmms-eval: the entry point's object is called with no arguments and must give a ModelManifest.
    fake = types.ModuleType("lmms_eval.models.registry_v2")

    class ModelManifest:
        def __init__(self, model_id, simple_class_path=None, chat_class_path=None):
            self.model_id, self.simple_class_path = model_id, simple_class_path

    fake.ModelManifest = ModelManifest
    monkeypatch.setitem(sys.modules, "lmms_eval", types.ModuleType("lmms_eval"))
    monkeypatch.setitem(sys.modules, "lmms_eval.models", types.ModuleType("lmms_eval.models"))
    monkeypatch.setitem(sys.modules, "lmms_eval.models.registry_v2", fake)
    m = lmms_plugin.VisualRWKVLmms()
    assert isinstance(m, ModelManifest) and m.model_id == "visualrwkv"
    module, name = m.simple_class_path.rsplit(".", 1)
    assert getattr(sys.modules[module], name) is lmms_plugin.VisualRWKVLmms
