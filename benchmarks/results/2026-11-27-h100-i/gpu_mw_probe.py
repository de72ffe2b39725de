"""Device probe (not a test of the suite): the GPU runs of test_master_weights_follow_fp32_weights_under_bf16
with their numbers printed: losses of fp32-weight runs (twice: is the GPU run deterministic?) and of the
master-weight run, and the weight deviations the test checks."""
import sys

import torch

sys.path.insert(0, "tests")
from test_train import _args, _run, _step_losses, env  # noqa: F401  (env: the module fixture)

from visualrwkv.checkpoint import load_state_dict_file


def test_probe(env, tmp_path):
    runs = {}
    for tag, mw in (("fp32a", 0), ("fp32b", 0), ("mw", 1)):
        proj = str(tmp_path / tag)
        argv = _args(env, proj, "--load_model", f"{env}/rwkv.pth", "--freeze_rwkv", 0, "--epoch_steps", 4,
                     "--epoch_count", 1, "--micro_bsz", 2, "--master_weights", mw, stage1=False)
        argv[argv.index("--precision") + 1] = "bf16"
        argv[argv.index("--accelerator") + 1] = "gpu"
        _run(argv)
        runs[tag] = (_step_losses(proj), load_state_dict_file(f"{proj}/rwkv-0.pth"))
        print("PROBE losses", tag, runs[tag][0], flush=True)
    start = load_state_dict_file(f"{env}/rwkv.pth")
    for other in ("fp32b", "mw"):
        w0, w1 = runs["fp32a"][1], runs[other][1]
        worst = []
        for n in w0:
            a, b = w1[n].float(), w0[n].to(w1[n].dtype).float()
            d = float((a - b).abs().max())
            frac = float((a != b).float().mean())
            key = n[len("rwkv."):]
            moved = float((w0[n].float() - start[key].float()).abs().max()) if key in start else float("nan")
            worst.append((d, frac, moved, n, str(w1[n].dtype)))
        worst.sort(reverse=True)
        for row in worst[:12]:
            print("PROBE", other, "vs fp32a: max|d| %.3g frac %.4f moved %.3g %s %s" % row, flush=True)
