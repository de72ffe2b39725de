"""End-to-end tests of ``visualrwkv train`` on the CPU with a tiny model (2 layers x 64, the tiny
CLIP tower of tests/utils.py) and tiny synthetic LLaVA records with 32 px PNGs.

Covered: stage 1 changes nothing but the projector (bit for bit); stage 2 trains exactly what the
freeze flags say and never the embedding; an overfit run drives the loss down; a run stopped after
k steps and resumed equals an uninterrupted one (losses step for step, final weights, with dropout
so the random state matters); 2 DDP processes equal 1 process with a doubled micro-batch; the
saved rwkv-<epoch>.pth loads back strictly with identical logits; user mistakes end in one line
with exit code 2; bad records are refused up front or skipped and counted.
"""
import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from utils import make_tiny_tower, random_rwkv6

from visualrwkv.checkpoint import load_state_dict_file, save_state_dict_file
from visualrwkv.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20)}




def _write_records(root, n_image=16, n_text=2):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = list(COLOURS)
    recs = []
    for i in range(n_image):
        name = names[i % len(names)]
        arr = np.zeros((32, 32, 3), np.uint8)
        arr[:] = COLOURS[name]
        arr[8 + i % 8: 20 + i % 8, 4:12] = 255  # a white bar so the images differ
        Image.fromarray(arr).save(os.path.join(root, "images", f"img{i}.png"))
        recs.append({"id": f"img{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": f"It is {name}."}]})
    for i in range(n_text):
        recs.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": f"Count to {i + 2}."},
                                                       {"from": "gpt", "value": " ".join(map(str, range(1, i + 3)))}]})
    return recs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    recs = _write_records(root)
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(recs, f)
    rwkv = random_rwkv6(n_layer=2, n_embd=64, seed=3)
    save_state_dict_file(rwkv.state_dict(), os.path.join(root, "rwkv.pth"))
    make_tiny_tower(os.path.join(root, "tower"))
    return root


def _args(env, proj, *extra, stage1=True):
    a = ["--data_file", f"{env}/data.json", "--image_folder", f"{env}/images", "--vision_tower_name",
         f"{env}/tower", "--proj_dir", proj, "--ctx_len", "64", "--grid_size", "-1", "--image_position", "middle",
         "--accelerator", "cpu", "--devices", "1", "--precision", "fp32", "--enable_progress_bar", "0",
         "--log_every_n_steps", "1", "--lr_init", "2e-3", "--lr_final", "5e-4", "--warmup_steps", "0",
         "--random_seed", "1"]
    if stage1:
        a += ["--load_model", f"{env}/rwkv.pth", "--freeze_rwkv", "2"]
    return a + [str(x) for x in extra]


def _run(argv):
    from visualrwkv.train.cli import train
    from visualrwkv.train.config import parse_args

    return train(parse_args(argv))


def _step_losses(proj):
    """Per-optimizer-step losses from the CSV logs of every run in proj (resumed runs add a version)."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(proj, "logs", "version_*", "metrics.csv"))):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("loss"):
                    rows[int(r["step"])] = float(r["loss"])
    return [rows[k] for k in sorted(rows)]


def _epoch_lines(proj):
    with open(os.path.join(proj, "train_log.txt")) as f:
        return [l.split() for l in f if l[:1].isdigit()]


def _tower_sd(env):
    from visualrwkv.models import vision

    return vision.load_vision_model(f"{env}/tower").state_dict()


# ---------------------------------------------------------------------------------------------- stage 1
@pytest.fixture(scope="module")
def stage1(env, tmp_path_factory):
    proj = str(tmp_path_factory.mktemp("s1"))
    res = _run(_args(env, proj, "--epoch_steps", 3, "--epoch_count", 2, "--epoch_save", 0, "--micro_bsz", 3))
    return proj, res


def test_stage1_changes_only_the_projector(env, stage1):
    from visualrwkv.models.visualrwkv import VisualRWKV

    proj, res = stage1
    assert sorted(os.path.basename(p) for p in glob.glob(f"{proj}/rwkv-*.pth")) == ["rwkv-1.pth"]  # epoch_save 0
    sd = load_state_dict_file(f"{proj}/rwkv-1.pth")
    start = VisualRWKV.from_rwkv(f"{env}/rwkv.pth", f"{env}/tower", -1, seed=1).state_dict()
    assert set(sd) == set(start)
    assert any(k.startswith("vit.") for k in sd) and any(k.startswith("rwkv.") for k in sd)
    assert not torch.equal(sd["proj.weight"], start["proj.weight"])
    for k in start:
        if k != "proj.weight":
            assert torch.equal(sd[k], start[k]), k  # bit-identical
    # and against the input files themselves
    rwkv = load_state_dict_file(f"{env}/rwkv.pth")
    for k, v in rwkv.items():
        assert torch.equal(sd["rwkv." + k], v), k
    for k, v in _tower_sd(env).items():
        assert torch.equal(sd["vit.vision_model." + k], v), k
    # outputs: one train_log line per mini-epoch, CSV metrics, the resumable state
    lines = _epoch_lines(proj)
    assert [l[0] for l in lines] == ["0", "1"]
    assert float(lines[1][2]) == pytest.approx(np.exp(float(lines[1][1])), rel=1e-3)  # perplexity
    assert len(_step_losses(proj)) == 6
    assert os.path.exists(f"{proj}/last.ckpt") and os.path.exists(f"{proj}/data_check.json")
    state = torch.load(f"{proj}/last.ckpt", map_location="cpu", weights_only=True)
    assert list(state["state_dict"]) == ["model.proj.weight"]  # frozen weights are not in the state


def test_saved_weights_load_back_strictly_with_identical_logits(env, stage1):
    from visualrwkv.models.visualrwkv import VisualRWKV

    proj, res = stage1
    trained = res.module.model.eval()
    loaded = VisualRWKV.from_checkpoint(f"{proj}/rwkv-1.pth", f"{env}/tower", -1).eval()
    ids = torch.tensor([[24281, 59, 33, -200, 261, 5585, 41693, 59, 1000, 2000]])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = trained(ids, pixel_values=pix, return_logits=True).logits
        b = loaded(ids, pixel_values=pix, return_logits=True).logits
    assert torch.equal(a, b)
    # strict: a file with a key removed is refused with the key named
    sd = load_state_dict_file(f"{proj}/rwkv-1.pth")
    del sd["rwkv.blocks.1.att.key.weight"]
    save_state_dict_file(sd, f"{proj}/broken.pth")
    with pytest.raises(UserError, match="rwkv.blocks.1.att.key.weight"):
        VisualRWKV.from_checkpoint(f"{proj}/broken.pth", f"{env}/tower", -1)


# ---------------------------------------------------------------------------------------------- stage 2
def test_stage2_trains_exactly_per_freeze_flags(env, stage1, tmp_path):
    proj1, _ = stage1
    proj = str(tmp_path / "s2")
    argv = _args(env, proj, "--model_path", f"{proj1}/rwkv-1.pth", "--freeze_rwkv", 1, "--freeze_proj", 1,
                 "--epoch_steps", 3, "--epoch_count", 1, "--micro_bsz", 2, "--weight_decay", 0.01, stage1=False)
    _run(argv)
    before = load_state_dict_file(f"{proj1}/rwkv-1.pth")
    after = load_state_dict_file(f"{proj}/rwkv-0.pth")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if k.startswith(("rwkv.blocks.1.", "rwkv.ln_out.", "rwkv.head."))}
    assert changed == expected
    assert "rwkv.emb.weight" not in changed and "proj.weight" not in changed


def test_stage2_default_freezing_never_trains_embedding(env, stage1, tmp_path):
    proj1, _ = stage1
    proj = str(tmp_path / "s2b")
    res = _run(_args(env, proj, "--model_path", f"{proj1}/rwkv-1.pth", "--freeze_rwkv", 0, "--epoch_steps", 2,
                     "--epoch_count", 1, "--micro_bsz", 2, "--grad_cp", 1, stage1=False))
    assert res.module.model.rwkv.grad_cp is True
    before = load_state_dict_file(f"{proj1}/rwkv-1.pth")
    after = load_state_dict_file(f"{proj}/rwkv-0.pth")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    learnable = {k for k in before if k.startswith(("rwkv.", "proj.")) and k != "rwkv.emb.weight"}
    assert changed == learnable
    assert torch.equal(before["rwkv.emb.weight"], after["rwkv.emb.weight"])


def test_overfit_loss_falls(env, tmp_path):
    # Four records, projector + blocks + head learn: the loss must fall well below its start.
    root = str(tmp_path / "small")
    recs = _write_records(root, n_image=4, n_text=0)
    with open(f"{root}/data.json", "w") as f:
        json.dump(recs, f)
    proj = str(tmp_path / "fit")
    argv = _args(env, proj, "--load_model", f"{env}/rwkv.pth", "--freeze_rwkv", 0, "--epoch_steps", 8,
                 "--epoch_count", 3, "--micro_bsz", 4, "--lr_init", 3e-3, "--lr_final", 1e-3, stage1=False)
    argv[argv.index("--data_file") + 1] = f"{root}/data.json"
    argv[argv.index("--image_folder") + 1] = f"{root}/images"
    _run(argv)
    losses = _step_losses(proj)
    assert len(losses) == 24
    assert losses[-1] < 0.35 * losses[0], losses


def test_packed_training_equals_padded(env, tmp_path):
    # --pack 1 runs each micro-batch as one packed row (the GPU default): same losses and weights.
    common = ["--freeze_rwkv", 0, "--epoch_steps", 2, "--epoch_count", 1, "--micro_bsz", 3]
    a, b = str(tmp_path / "pad"), str(tmp_path / "pack")
    r1 = _run(_args(env, a, "--load_model", f"{env}/rwkv.pth", *common, "--pack", 0, stage1=False))
    r2 = _run(_args(env, b, "--load_model", f"{env}/rwkv.pth", *common, "--pack", 1, stage1=False))
    assert r1.module.pack is False and r2.module.pack is True
    np.testing.assert_allclose(_step_losses(b), _step_losses(a), rtol=1e-5)
    x, y = load_state_dict_file(f"{a}/rwkv-0.pth"), load_state_dict_file(f"{b}/rwkv-0.pth")
    for n in x:
        torch.testing.assert_close(y[n], x[n], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [1, 2])  # stopped inside mini-epoch 0 / exactly at its end
def test_resume_equals_uninterrupted(env, tmp_path, k):
    # Stage-2-like (blocks 1.., head, projector learn) so optimizer moments matter; dropout so the
    # random state matters; accumulation 2 -> 2 optimizer steps per mini-epoch of 4 micro-steps.
    common = ["--freeze_rwkv", 1, "--epoch_steps", 4, "--epoch_count", 2, "--epoch_save", 1, "--micro_bsz", 2,
              "--accumulate_grad_batches", 2, "--dropout", 0.2, "--weight_decay", 0.05, "--weight_decay_final",
              0.01, "--warmup_steps", 2]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(_args(env, full, "--load_model", f"{env}/rwkv.pth", *common, stage1=False))
    _run(_args(env, part, "--load_model", f"{env}/rwkv.pth", *common, "--max_steps", k, stage1=False))
    assert len(_step_losses(part)) == k
    assert not os.path.exists(f"{part}/rwkv-1.pth")
    res = _run(_args(env, part, "--load_model", f"{env}/rwkv.pth", *common, stage1=False))  # same command again
    assert res is not None
    a, b = _step_losses(full), _step_losses(part)
    assert len(a) == 4 and a == b  # step for step, exactly
    assert [l[:4] for l in _epoch_lines(full)] == [l[:4] for l in _epoch_lines(part)]
    for name in ("rwkv-0.pth", "rwkv-1.pth"):
        x, y = load_state_dict_file(f"{full}/{name}"), load_state_dict_file(f"{part}/{name}")
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x), name
    # A finished run started again does nothing.
    assert _run(_args(env, part, "--load_model", f"{env}/rwkv.pth", *common, stage1=False)) is None


def test_resume_with_master_weights_equals_uninterrupted(env, tmp_path):
    """--master_weights 1: the fp32 masters and moments come back from last.ckpt in fp32 (not rounded to
    their bf16 weights' dtype), so a resumed run equals an uninterrupted one step for step."""
    common = ["--freeze_rwkv", 1, "--epoch_steps", 2, "--epoch_count", 2, "--epoch_save", 1, "--micro_bsz", 2,
              "--weight_decay", 0.05, "--warmup_steps", 1, "--precision", "bf16", "--master_weights", 1]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(_args(env, full, "--load_model", f"{env}/rwkv.pth", *common, stage1=False))
    _run(_args(env, part, "--load_model", f"{env}/rwkv.pth", *common, "--max_steps", 3, stage1=False))
    _run(_args(env, part, "--load_model", f"{env}/rwkv.pth", *common, stage1=False))
    a, b = _step_losses(full), _step_losses(part)
    assert len(a) == 4 and a == b
    x, y = load_state_dict_file(f"{full}/rwkv-1.pth"), load_state_dict_file(f"{part}/rwkv-1.pth")
    assert x["rwkv.head.weight"].dtype == torch.bfloat16
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_resume_refuses_other_sample_order(env, stage1):
    proj, _ = stage1
    # same proj_dir, other micro-batch size: the saved position would mean other samples
    with pytest.raises(UserError, match="micro_bsz"):
        _run(_args(env, proj, "--epoch_steps", 3, "--epoch_count", 3, "--micro_bsz", 2))


def test_resume_refuses_other_frozen_weights(env, tmp_path):
    proj = str(tmp_path / "fz")
    _run(_args(env, proj, "--epoch_steps", 3, "--epoch_count", 1, "--micro_bsz", 2, "--max_steps", 1))
    other = random_rwkv6(n_layer=2, n_embd=64, seed=4)
    save_state_dict_file(other.state_dict(), str(tmp_path / "other.pth"))
    argv = _args(env, proj, "--epoch_steps", 3, "--epoch_count", 1, "--micro_bsz", 2)
    argv[argv.index("--load_model") + 1] = str(tmp_path / "other.pth")
    with pytest.raises(UserError, match="frozen weights differ"):
        _run(argv)


# ---------------------------------------------------------------------------------------------- DDP
def _cli(argv, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "visualrwkv.cli", "train", *map(str, argv)], cwd=REPO, env=e,
                          capture_output=True, text=True, **kw)


def test_model_buffers_are_constants_so_ddp_need_not_broadcast_them(env, tmp_path):
    # make_strategy tells DDP not to broadcast buffers before each forward (no_buffer_sync_kwargs): right
    # only while every buffer is a constant that each rank builds alike (the CLIP tower's position ids).
    # A new buffer must be looked at here.
    from visualrwkv.train.config import parse_args
    from visualrwkv.train.model import build_model

    model = build_model(parse_args(_args(env, str(tmp_path / "p"))))
    names = [n for n, _ in model.named_buffers()]
    assert names and all(n.endswith("embeddings.position_ids") for n in names), names
    for _, b in model.named_buffers():
        assert torch.equal(b.flatten(), torch.arange(b.numel()))


def test_ddp_two_processes_equal_one_with_double_batch(env, tmp_path):
    common = ["--freeze_rwkv", 1, "--epoch_steps", 3, "--epoch_count", 1, "--warmup_steps", 0]
    one, two, two_bf16 = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "two_bf16")
    _run(_args(env, one, "--load_model", f"{env}/rwkv.pth", *common, "--micro_bsz", 4, stage1=False))
    for proj, dtype in ((two, "fp32"), (two_bf16, "bf16")):
        argv = _args(env, proj, "--load_model", f"{env}/rwkv.pth", *common, "--micro_bsz", 2, stage1=False)
        argv[argv.index("--devices") + 1] = "2"
        r = _cli(argv + ["--strategy", "ddp", "--ddp_grad_dtype", dtype], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = _step_losses(one), _step_losses(two), _step_losses(two_bf16)
    assert len(a) == len(b) == len(c) == 3
    np.testing.assert_allclose(b, a, rtol=1e-5)
    x, y = load_state_dict_file(f"{one}/rwkv-0.pth"), load_state_dict_file(f"{two}/rwkv-0.pth")
    for n in x:
        torch.testing.assert_close(y[n], x[n], rtol=1e-4, atol=1e-5)
    assert float(_epoch_lines(two)[0][1]) == pytest.approx(float(_epoch_lines(one)[0][1]), rel=1e-5)
    # bf16 all-reduce: the same first loss (before any update), later ones and the weights within bf16
    # rounding of the gradients, and measurably not the fp32 reduction (the hook really ran).
    # (The hook's arithmetic itself: test_train_optim.py.)
    z = load_state_dict_file(f"{two_bf16}/rwkv-0.pth")
    assert c[0] == pytest.approx(a[0], rel=1e-5)
    np.testing.assert_allclose(c, a, rtol=1e-3)
    fp32_dev = max(float((y[n] - x[n]).abs().max()) for n in x)
    bf16_dev = max(float((z[n] - x[n]).abs().max()) for n in x)
    # AdamW moves a weight by about lr per step whatever the gradient's rounding: 3 steps at lr <= 2e-3
    assert max(100 * fp32_dev, 1e-6) < bf16_dev < 3 * 2 * 2e-3 * 2


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_master_weights_follow_fp32_weights_under_bf16(env, tmp_path, accelerator):
    """--master_weights 1 (bf16 linear weights, fp32 masters in the optimizer) against fp32 weights under the
    same bf16 autocast: the same arithmetic, so the same losses step for step and the same weights up to
    the bf16 rounding of the saved linear weights (the fp32 run's weights rounded to bf16). On a GPU the
    model is built and converted on the CPU and moved by Lightning, and the optimizer's kernel is Triton's."""
    runs = {}
    for mw in (0, 1):
        proj = str(tmp_path / f"mw{mw}")
        argv = _args(env, proj, "--load_model", f"{env}/rwkv.pth", "--freeze_rwkv", 0, "--epoch_steps", 4,
                     "--epoch_count", 1, "--micro_bsz", 2, "--master_weights", mw, stage1=False)
        argv[argv.index("--precision") + 1] = "bf16"
        argv[argv.index("--accelerator") + 1] = accelerator
        _run(argv)
        runs[mw] = (_step_losses(proj), load_state_dict_file(f"{proj}/rwkv-0.pth"))
    (l0, w0), (l1, w1) = runs[0], runs[1]
    assert len(l0) == len(l1) == 4
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    start = load_state_dict_file(f"{env}/rwkv.pth")
    linear = [n for n in w1 if w1[n].dtype == torch.bfloat16 and w0[n].dtype == torch.float32]
    assert {"rwkv.head.weight", "rwkv.blocks.0.att.key.weight", "proj.weight"} <= set(linear)
    others = [n for n in w0 if n not in linear and n[len("rwkv."):] in start]
    assert "rwkv.blocks.0.att.time_maa_w1" in others and "rwkv.blocks.1.ln2.weight" in others
    for n in w0:
        if n in linear:
            a, b = w1[n].float(), w0[n].to(torch.bfloat16).float()
            # within a bf16 ulp (1e-6 absolute for weights AdamW brought to about 0: fp32 cancellation)
            bad = (a - b).abs() > 2 ** -7 * b.abs() + 1e-6
            assert not bad.any(), (f"{n}: {int(bad.sum())} of {b.numel()} elements beyond a bf16 ulp, e.g. "
                                   f"{a[bad][:4].tolist()} vs {b[bad][:4].tolist()}; losses {l1} vs {l0}")
            assert (a != b).float().mean() < 0.01, n
        elif n.startswith("rwkv.") and n[len("rwkv."):] in start:
            # Other weights: the last-bit differences of a few bf16 weights make AdamW's steps differ where
            # gradients are about 0; the two runs still agree far within what training moved them.
            moved = float((w0[n].float() - start[n[len("rwkv."):]].float()).abs().max())
            assert float((w1[n].float() - w0[n].float()).abs().max()) <= 0.1 * moved + 1e-6, n
    key = next(k for k in start if k.endswith("blocks.0.att.key.weight"))
    assert not torch.equal(w1["rwkv.blocks.0.att.key.weight"].float(), start[key].to(torch.bfloat16).float())


def test_ddp_with_master_weights_follows_one_process(env, tmp_path):
    """--master_weights 1 under DDP: the bf16 gradients are averaged in bf16 (DDP's buckets take the
    parameters' dtype); two processes follow one process with the doubled micro-batch within that rounding."""
    common = ["--freeze_rwkv", 1, "--epoch_steps", 3, "--epoch_count", 1, "--warmup_steps", 0, "--master_weights", 1]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    argv = _args(env, one, "--load_model", f"{env}/rwkv.pth", *common, "--micro_bsz", 4, stage1=False)
    argv[argv.index("--precision") + 1] = "bf16"
    _run(argv)
    argv = _args(env, two, "--load_model", f"{env}/rwkv.pth", *common, "--micro_bsz", 2, stage1=False)
    argv[argv.index("--precision") + 1] = "bf16"
    argv[argv.index("--devices") + 1] = "2"
    r = _cli(argv + ["--strategy", "ddp"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _step_losses(one), _step_losses(two)
    assert len(a) == len(b) == 3
    assert b[0] == pytest.approx(a[0], rel=1e-4)  # before any update: the same model, the same 4 samples
    np.testing.assert_allclose(b, a, rtol=2e-3)
    x, y = load_state_dict_file(f"{one}/rwkv-0.pth"), load_state_dict_file(f"{two}/rwkv-0.pth")
    assert y["rwkv.head.weight"].dtype == torch.bfloat16
    start = load_state_dict_file(f"{env}/rwkv.pth")
    head_moved = float((x["rwkv.head.weight"].float() - start["head.weight"].float()).abs().max())
    assert head_moved > 1e-3  # trained
    # The two runs differ by far less than training moved the weights (in the mean: where a gradient is
    # about 0, its rounding can flip the sign of AdamW's first steps)
    moved = torch.cat([(x[n].float() - start[n[5:]].float()).flatten() for n in x if n[5:] in start]).abs().mean()
    apart = torch.cat([(y[n].float() - x[n].float()).flatten() for n in x if n[5:] in start]).abs().mean()
    assert float(apart) < 0.01 * float(moved)  # measured: 7e-4


# ---------------------------------------------------------------------------------------------- mistakes
def _main(argv, capsys):
    from visualrwkv.cli import main

    code = main(["train", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_user_mistakes_one_line_exit_2(env, tmp_path, capsys):
    proj = str(tmp_path / "m")
    cases = [
        (_args(env, proj) + ["--bogus_flag", "1"], "--bogus_flag"),
        (_args(env, proj) + ["--model_path", f"{env}/rwkv.pth"], "--model_path"),  # both sources
        (_args(env, proj) + ["--weight_decay_final", "0.1"], "--weight_decay_final"),
        (_args(env, proj) + ["--ddp_grad_dtype", "bf16"], "--ddp_grad_dtype"),  # without --strategy ddp
        (_args(env, proj) + ["--master_weights", "1"], "--precision bf16"),  # fp32 training
        (_args(env, proj) + ["--tune_kernels", "1"], "--compile 1"),
        (_args(env, proj, "--precision", "bf16", "--master_weights", "1", "--accumulate_grad_batches", "2"),
         "--accumulate_grad_batches 1"),
    ]
    missing = _args(env, proj)
    missing[missing.index("--data_file") + 1] = f"{env}/nope.json"
    cases.append((missing, "nope.json"))
    wrong_dims = _args(env, proj) + ["--n_embd", "128", "--n_layer", "2"]
    cases.append((wrong_dims, "--n_embd 128"))
    for argv, word in cases:
        code, err = _main(argv, capsys)
        assert code == 2, argv
        assert len(err) == 1 and word in err[0] and err[0].startswith("visualrwkv train: error:"), err


def test_cli_subprocess_no_traceback(env, tmp_path):
    r = _cli(["--data_file", f"{env}/missing.json", "--load_model", f"{env}/rwkv.pth", "--proj_dir",
              str(tmp_path / "x")], timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "missing.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # A checkpoint that does not fit the flags: caught before Lightning prints its banner.
    r = _cli(_args(env, str(tmp_path / "y")) + ["--n_embd", "128", "--n_layer", "2"], timeout=200)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if "torchvision" not in x]  # transformers' notice
    assert len(lines) == 1 and "--n_embd 128" in lines[0], r.stderr
    r = _cli(["--help"], timeout=120)
    assert r.returncode == 0 and "stage 1" in r.stdout and "stage 2" in r.stdout


# ---------------------------------------------------------------------------------------------- bad data
def test_bad_records_refused_up_front_or_skipped(env, tmp_path):
    root = str(tmp_path / "bad")
    recs = _write_records(root, n_image=8, n_text=1)
    with open(f"{root}/images/img3.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot really")  # corrupt
    os.remove(f"{root}/images/img5.png")  # missing
    recs.append({"id": "two_images", "image": "img1.png", "conversations": [
        {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]})
    with open(f"{root}/data.json", "w") as f:
        json.dump(recs, f)
    proj = str(tmp_path / "p")
    argv = _args(env, proj, "--epoch_steps", 2, "--epoch_count", 2, "--micro_bsz", 3)
    argv[argv.index("--data_file") + 1] = f"{root}/data.json"
    argv[argv.index("--image_folder") + 1] = f"{root}/images"
    with pytest.raises(UserError) as e:
        _run(argv)
    msg = str(e.value)
    assert "3 record(s)" in msg and "img3" in msg and "img5" in msg and "two_images" in msg
    assert not os.path.exists(f"{proj}/last.ckpt")  # refused before training
    _run(argv + ["--bad_records", "skip"])
    with open(f"{proj}/train_log.txt") as f:
        log = f.read()
    assert "used 7" in log and "skipped_bad 3" in log
    assert len(_epoch_lines(proj)) == 2


def test_from_scratch_defines_model_from_flags(env, tmp_path):
    proj = str(tmp_path / "scratch")
    # (3 steps: the published init zeroes the output projections, so nothing reaches the image
    # tokens before the first update.)
    res = _run(_args(env, proj, "--n_layer", 2, "--n_embd", 64, "--vocab_size", 65536, "--epoch_steps", 3,
                     "--epoch_count", 1, "--micro_bsz", 2, "--freeze_rwkv", 0, "--train_vit", 1, stage1=False))
    m = res.module.model
    assert (m.rwkv.cfg.n_layer, m.rwkv.cfg.n_embd) == (2, 64)
    sd = load_state_dict_file(f"{proj}/rwkv-0.pth")
    tower = _tower_sd(env)
    # --train_vit 1: the tower learned too
    assert any(not torch.equal(sd["vit.vision_model." + k], v) for k, v in tower.items() if v.is_floating_point())


@pytest.mark.parametrize("accum", [1, 2])
def test_gradients_freed_right_after_the_optimizer_step(env, tmp_path, monkeypatch, accum):
    # Lightning would zero them only after the next training_step, so that forward would run on top
    # of a full set of stale gradients; inside an accumulation window they must stay.
    from visualrwkv.train.module import VisualRWKVTrainModule

    seen = []
    step = VisualRWKVTrainModule.training_step

    def spy(self, batch, batch_idx):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        seen.append(any(p.grad is not None for p in trainable))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(VisualRWKVTrainModule, "training_step", spy)
    # --epoch_steps counts micro-batches: 4 of them are 4 / accum optimizer steps.
    _run(_args(env, str(tmp_path), "--epoch_steps", 4, "--epoch_count", 1, "--epoch_save", 0, "--micro_bsz", 2,
               "--accumulate_grad_batches", accum))
    assert seen == [i % accum != 0 for i in range(4)]
