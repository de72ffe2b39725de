"""The quickstart pipeline, shortened (--fast): data -> stage 1 -> stage 2 -> eval -> chat command.
The full run (accuracy, wall time) is measured by benchmarks/bench_quickstart.py, not here."""
import json
import os
import shlex
import subprocess
import sys

from visualrwkv.quickstart import score_answers


def _cli(args, timeout):
    # A separate process: the training code configures Lightning's logging, which must not leak
    # into the other tests of this session.
    return subprocess.run([sys.executable, "-m", "visualrwkv.cli"] + args, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_fast_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    qs = _cli(["quickstart", "--fast", "--out", str(out), "--threads", "1"], timeout=600)
    assert qs.returncode == 0, qs.stderr[-2000:]
    printed = qs.stdout
    for name in ("visualrwkv-quickstart.pth", "answers.jsonl", "scores.json", "stage1/rwkv-0.pth",
                 "stage2/train_log.txt", "tower/config.json", "data/test.jsonl"):
        assert (out / name).exists(), name
    scores = json.loads((out / "scores.json").read_text())
    assert scores["accuracy"]["all"]["n"] == 24  # 4 held-out images x 6 question types, one answer each
    assert "chance" in scores and "talk to it:" in printed
    # The printed chat command works on the produced checkpoint.
    cmd = (out / "chat_command.txt").read_text().strip()
    assert cmd in printed
    args = shlex.split(cmd)[1:] + ["--max_new_tokens", "4", "--device", "cpu"]
    run = _cli(args, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_scoring_is_exact_match_per_type(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "type": "colour", "answer": "red"},
        {"question_id": 2, "type": "colour", "answer": "blue"},
        {"question_id": 3, "type": "count", "answer": "2"}]) + "\n")
    answers = tmp_path / "a.jsonl"
    answers.write_text("\n".join(json.dumps(a) for a in [
        {"question_id": 1, "text": " Red."}, {"question_id": 2, "text": "green"}, {"question_id": 3, "text": "2"}]) + "\n")
    s = score_answers(str(answers), str(test))
    assert s["colour"] == {"n": 2, "accuracy": 0.5}
    assert s["count"]["accuracy"] == 1.0
    assert abs(s["all"]["accuracy"] - 2 / 3) < 1e-12
