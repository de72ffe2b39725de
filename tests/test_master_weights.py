"""bf16 linear weights with fp32 master copies (``--master_weights 1``): the optimizer's update equals
torch's AdamW on the fp32 weights, its state survives a save/load in fp32, the Triton kernel follows the
torch reference (Triton's CPU interpreter) and equals torch's fused AdamW bit for bit (GPU), the model
computes the same loss and gradients as with fp32 weights under bf16 autocast, and ``visualrwkv train``
with it follows the fp32-weight run."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from visualrwkv.ops.adamw import adamw_master_
from visualrwkv.train.optim import MasterAdamW, bf16_linear_weights_, clip_grad_norm_in_step_
from utils import random_rwkv6

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _pair(seed=0):
    """(fp32 weights, the same weights with the matrix in bf16): a 37 x 53 matrix (odd sizes) and a vector."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 53, generator=g).to(torch.bfloat16).float()  # exactly representable in bf16
    v = torch.randn(53, generator=g)
    full = [nn.Parameter(w.clone()), nn.Parameter(v.clone())]
    half = [nn.Parameter(w.clone().to(torch.bfloat16)), nn.Parameter(v.clone())]
    return full, half


def _grads(full, half, g):
    dev = full[0].device
    gw = torch.randn(37, 53, generator=g).to(device=dev, dtype=torch.bfloat16)  # a bf16 matmul's gradient
    gv = torch.randn(53, generator=g).to(dev)
    full[0].grad, full[1].grad = gw.float(), gv.clone()
    half[0].grad, half[1].grad = gw.clone(), gv.clone()


@pytest.mark.parametrize("clip", [None, 0.5])
def test_master_adamw_equals_torch_adamw_on_fp32_weights(clip):
    full, half = _pair()
    ref = torch.optim.AdamW(full, fused=True, **HP)
    opt = MasterAdamW(half, **HP)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        _grads(full, half, g)
        if clip is not None:  # clipping folded into both fused steps through grad_scale
            n_ref = clip_grad_norm_in_step_(ref, full, clip)
            n = clip_grad_norm_in_step_(opt, half, clip)
            torch.testing.assert_close(n, n_ref, rtol=1e-6, atol=0)
            assert float(n) > clip  # the clipping really scales
        ref.step()
        opt.step()
    master = opt.state[half[0]]["master"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, full[0].detach(), rtol=2e-6, atol=1e-7)
    assert torch.equal(half[0].detach(), master.to(torch.bfloat16))  # the weight is its master, rounded
    if clip is None:  # fp32 parameters: torch's own fused kernel (with clipping, the norms' summation order differs)
        assert torch.equal(half[1].detach(), full[1].detach())
    torch.testing.assert_close(half[1].detach(), full[1].detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(master, master.to(torch.bfloat16).float())  # the master keeps what bf16 drops


def test_master_adamw_state_dict_keeps_fp32_and_resumes_exactly():
    full, half = _pair(2)
    opt = MasterAdamW(half, **HP)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        _grads(full, half, g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    _, other = _pair(2)
    with torch.no_grad():
        for p, q in zip(other, half):
            p.copy_(q)
    resumed = MasterAdamW(other, **HP)
    resumed.load_state_dict(saved)
    st = resumed.state[other[0]]
    assert st["master"].dtype == torch.float32 and st["step"] == 2
    assert torch.equal(st["master"], opt.state[half[0]]["master"])
    for _ in range(2):
        _grads(full, half, g)
        other[0].grad, other[1].grad = half[0].grad.clone(), half[1].grad.clone()
        opt.step()
        resumed.step()
    for p, q in zip(other, half):
        assert torch.equal(p, q)
    assert torch.equal(resumed.state[other[0]]["master"], opt.state[half[0]]["master"])


def test_adamw_master_rejects_wrong_state():
    p = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="master"):
        adamw_master_(p, p, torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4), torch.zeros(4, 4), lr=1e-3,
                      beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        adamw_master_(p, p, torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), lr=1e-3, beta1=0.9, beta2=0.99,
                      eps=1e-8, weight_decay=0.0, step=1, backend="cuda")


_INTERPRETED = r"""
import torch
from visualrwkv.ops.adamw import _triton_adamw_master_, reference_adamw_master_
g = torch.Generator().manual_seed(0)
for n, scale in ((5000, None), (2048, torch.tensor(3.0)), (37, torch.tensor(0.7))):  # several programs, a tail
    w, a0, b0 = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    states = [[w.to(torch.bfloat16), None, w.clone(), a0.clone(), b0.clone()] for _ in range(2)]
    for step in (1, 7):
        grad = torch.randn(n, generator=g).to(torch.bfloat16)
        for (p, _, m, a, b), fn in zip(states, (_triton_adamw_master_, reference_adamw_master_)):
            fn(p, grad, m, a, b, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step, grad_scale=scale)
        (p1, _, m1, a1, b1), (p2, _, m2, a2, b2) = states
        for x, y in ((m1, m2), (a1, a2), (b1, b2)):
            # fp32 op order; and the interpreter evaluates fma(-b1, g, g) = g - b1 g as a product and a sum,
            # rounded twice, which the cancellation magnifies to ~10 ulp (the GPU's fma rounds once)
            torch.testing.assert_close(x, y, rtol=3e-5, atol=1e-6 * float(y.abs().max()))
        # at most a bf16 ulp apart: the interpreter rounds to bf16 toward zero, the GPU to nearest (the GPU
        # test checks that the weight is exactly its master rounded)
        assert ((p1.float() - p2.float()).abs() <= 2 ** -7 * m2.abs()).all()
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_equals_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_equals_torch_fused_adamw_bit_for_bit_on_gpu():
    """On the GPU the Triton kernel rounds every operation as torch's fused AdamW kernel does (the optimizer
    of an fp32-weight run): master, moments and weight equal to the bit at every step, with and without
    weight decay and the clipping scale, odd sizes (a last-bit difference would make a --master_weights 1
    run drift from the fp32-weight run). The torch-ops reference rounds its own way, far within one step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    three, half = torch.tensor(3.0, device="cuda"), torch.tensor(0.7, device="cuda")
    for n, scale, wd in ((300001, None, 0.01), (4096, three, 0.0), (37, half, 0.1)):
        w = torch.randn(n, generator=g, device="cuda")
        moments = (torch.randn(n, generator=g, device="cuda") * 1e-3, torch.rand(n, generator=g, device="cuda") * 1e-6)
        tri = [w.to(torch.bfloat16), w.clone(), moments[0].clone(), moments[1].clone()]
        ref = [w.to(torch.bfloat16), w.clone(), moments[0].clone(), moments[1].clone()]
        fused = [w.clone(), moments[0].clone(), moments[1].clone()]  # fp32 weight, exp_avg, exp_avg_sq
        for step in (1, 2, 7, 100):
            steps = [torch.tensor(float(step), device="cuda")]  # the op reads the count (AdamW adds 1 before)
            grad = (torch.randn(n, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)
            kw = dict(lr=2e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, step=step, grad_scale=scale)
            adamw_master_(tri[0], grad, *tri[1:], backend="triton", **kw)
            adamw_master_(ref[0], grad, *ref[1:], backend="reference", **kw)
            torch._fused_adamw_([fused[0]], [grad.float()], [fused[1]], [fused[2]], [], steps, lr=2e-3, beta1=0.9,
                                beta2=0.99, weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False,
                                grad_scale=scale, found_inf=None)
            for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), tri[1:], fused):
                bad = int((a != b).sum())
                assert bad == 0, f"{name}: {bad} of {n} elements differ from torch's fused AdamW at step {step}"
            assert torch.equal(tri[0], tri[1].to(torch.bfloat16))
            # the reference's own roundings: far below one step (lr) for the master, ~1e-5 for the moments
            # (r44 on an H100: master within 7.3e-8 of the fused kernel's)
            torch.testing.assert_close(ref[1], fused[0], rtol=0, atol=1e-3 * kw["lr"])
            for a, b in zip(ref[2:], fused[1:]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_master_adamw_of_a_model_equals_torch_fused_adamw_on_gpu():
    """MasterAdamW over a model-like list of bf16 matrices (odd sizes too) and fp32 vectors, with weight decay
    and clipping in the step: weights, masters and moments equal to the bit to torch's fused AdamW on the
    same weights in fp32 over 5 steps."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2048, 64), (64, 2048), (5, 32, 96), (37, 53), (1024, 16), (96,), (7,)]
    start = [torch.randn(*sh, generator=g).to(torch.bfloat16).float() for sh in shapes]
    full = [nn.Parameter(w.cuda()) for w in start]
    half = [nn.Parameter(w.cuda().to(torch.bfloat16) if w.dim() > 1 else w.cuda()) for w in start]
    hp = dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ref, opt = torch.optim.AdamW(full, fused=True, **hp), MasterAdamW(half, **hp)
    for _ in range(5):
        for f, h in zip(full, half):
            gr = (torch.randn(f.shape, generator=g) * 0.3).cuda()
            h.grad = gr.to(h.dtype)
            f.grad = h.grad.float().clone()  # its own tensor: a fused step writes the unscaled gradient back
        clip_grad_norm_in_step_(ref, full, 0.5)
        clip_grad_norm_in_step_(opt, half, 0.5)
        ref.step()
        opt.step()
    for f, h in zip(full, half):
        if h.dtype == torch.float32:
            assert torch.equal(h, f)
            continue
        st, fs = opt.state[h], ref.state[f]
        assert torch.equal(st["master"], f.detach()), tuple(h.shape)
        assert torch.equal(st["exp_avg"], fs["exp_avg"]) and torch.equal(st["exp_avg_sq"], fs["exp_avg_sq"])
        assert torch.equal(h.detach(), f.detach().to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_master_adamw_on_gpu_equals_torch_adamw():
    full, half = _pair(4)
    full = [nn.Parameter(p.detach().cuda()) for p in full]
    half = [nn.Parameter(p.detach().cuda()) for p in half]
    ref = torch.optim.AdamW(full, fused=True, **HP)
    opt = MasterAdamW(half, **HP)
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        _grads(full, half, g)
        clip_grad_norm_in_step_(ref, full, 0.5)
        clip_grad_norm_in_step_(opt, half, 0.5)
        ref.step()
        opt.step()
    master = opt.state[half[0]]["master"]
    # the fused kernel's arithmetic and the same clipping factor (norms summed in float64): to the bit
    assert torch.equal(master, full[0].detach())
    assert torch.equal(half[0].detach(), master.to(torch.bfloat16))  # the kernel rounds to nearest even
    assert torch.equal(half[1].detach(), full[1].detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_master_weights_of_a_model_converted_on_the_cpu_then_moved():
    """As in 'visualrwkv train': the model is built and converted on the CPU, Lightning moves it to the GPU;
    the masters start on the GPU from the fp32 weights of before the conversion."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    before = lin.weight.detach().clone()
    bf16_linear_weights_(lin)
    lin.cuda()
    opt = MasterAdamW(lin.parameters(), **HP)
    lin(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)).float().pow(2).sum().backward()
    opt.step()
    master = opt.state[lin.weight]["master"]
    assert master.device.type == "cuda" and master.dtype == torch.float32
    assert 0 < float((master.cpu() - before).abs().max()) <= 1.1 * HP["lr"]  # one step from the fp32 start
    assert torch.equal(lin.weight.detach(), master.to(torch.bfloat16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_bf16_linear_weights_same_loss_and_gradients_under_autocast(device):
    """A tiny RWKV-6 under bf16 autocast (on a GPU: fla's WKV kernels, the fused ln_x + gate): with its
    trainable linear weights stored in bf16 the loss and every gradient equal those of the fp32 weights
    (autocast computes with the bf16-rounded weight either way; the fp32 weights' gradients are the bf16
    matmul outputs, cast)."""
    model = random_rwkv6(n_layer=2, n_embd=64, seed=7).to(device)
    with torch.no_grad():  # weights representable in bf16, as after the first master-weight step
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    model.emb.requires_grad_(False)
    half = copy.deepcopy(model)
    names = bf16_linear_weights_(half)
    assert names and all(n.endswith(".weight") for n in names)
    assert "head.weight" in names and not any(n.startswith("emb") for n in names)
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if n not in names)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0)).to(device)
    grads = []
    for m in (model, half):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = m(ids)[0]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    assert all(dict(half.named_parameters())[n].grad.dtype == torch.bfloat16 for n in names)


def test_compile_for_training_tune_kernels_sets_inductor_tuning():
    import torch._inductor.config as inductor_config

    from torch._functorch import config as functorch_config

    from visualrwkv.train.model import compile_for_training

    def model():  # what compile_for_training touches of a VisualRWKV (compilation itself is lazy)
        return type("M", (), {"rwkv": random_rwkv6(n_layer=1, n_embd=64, vocab_size=256), "vit": None})()

    before = inductor_config.coordinate_descent_tuning, functorch_config.activation_memory_budget
    try:
        inductor_config.coordinate_descent_tuning = False
        compile_for_training(model(), compile_vit=False, wkv_custom_op=False)
        assert inductor_config.coordinate_descent_tuning is False
        compile_for_training(model(), compile_vit=False, wkv_custom_op=False, tune_kernels=True)
        assert inductor_config.coordinate_descent_tuning is True
    finally:
        inductor_config.coordinate_descent_tuning, functorch_config.activation_memory_budget = before
