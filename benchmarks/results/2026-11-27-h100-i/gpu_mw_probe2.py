"""Device probe (not a suite test): where the --master_weights 1 GPU run leaves the fp32-weight run.
1. a tiny RWKV-6 under CUDA autocast: loss and gradients, fp32 vs bf16 linear weights (every difference printed);
2. the CLI runs with the master-weight optimizer's kernel forced to the torch reference."""
import copy
import sys

import torch
from torch import nn

sys.path.insert(0, "tests")
from test_train import _args, _run, _step_losses, env  # noqa: F401
from utils import random_rwkv6

import visualrwkv.ops.adamw as adamw_mod
from visualrwkv.train.optim import bf16_linear_weights_


def test_model_grads():
    model = random_rwkv6(n_layer=2, n_embd=64, seed=7).cuda()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    model.emb.requires_grad_(False)
    half = copy.deepcopy(model)
    bf16_linear_weights_(half)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0)).cuda()
    out = []
    for m in (model, half):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(ids)[0]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        out.append((loss.detach(), logits.detach().float(),
                    {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}))
    print("PROBE2 model loss", float(out[0][0]), float(out[1][0]), "logits max|d|",
          float((out[0][1] - out[1][1]).abs().max()), flush=True)
    for n in out[0][2]:
        a, b = out[0][2][n], out[1][2][n]
        d = float((a - b).abs().max())
        if d > 0:
            print("PROBE2 grad %s max|d| %.3g (max|g| %.3g) frac %.3f" % (n, d, float(a.abs().max()),
                                                                         float((a != b).float().mean())), flush=True)


def test_cli_reference_kernel(env, tmp_path, monkeypatch):
    losses = {}
    for tag, mw in (("fp32", 0), ("mw_ref", 1)):
        if tag == "mw_ref":
            monkeypatch.setattr(adamw_mod, "resolve_backend", lambda backend, device: "reference")
        proj = str(tmp_path / tag)
        argv = _args(env, proj, "--load_model", f"{env}/rwkv.pth", "--freeze_rwkv", 0, "--epoch_steps", 4,
                     "--epoch_count", 1, "--micro_bsz", 2, "--master_weights", mw, stage1=False)
        argv[argv.index("--precision") + 1] = "bf16"
        argv[argv.index("--accelerator") + 1] = "gpu"
        _run(argv)
        losses[tag] = _step_losses(proj)
        print("PROBE2 losses", tag, losses[tag], flush=True)
