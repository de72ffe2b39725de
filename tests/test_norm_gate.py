"""ln_x + gate operator (ops/norm_gate.py): the fused Triton kernels against the PyTorch reference."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visualrwkv.ops.norm_gate import norm_gate, reference_norm_gate
from utils import ptxas_for_hopper, rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in Triton's CPU interpreter (a subprocess: the interpreter is chosen when kernels are defined).
# fp32 must agree to rounding; the interpreter casts float32 -> bf16 by truncation where a GPU rounds to
# nearest, so bf16 is checked only to a few bf16 steps here, and to the GPU's rounding in the GPU test.
_INTERPRETED = textwrap.dedent('''
    import torch, torch.nn.functional as F
    from visualrwkv.ops.norm_gate import norm_gate_triton, reference_norm_gate

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        for M, H in ((37, 4), (130, 2)):  # odd row counts, one and several row blocks
            C = 64 * H
            y = (torch.randn(M, C, generator=gen) * 2 + 0.5).to(dtype)
            g = torch.randn(M, C, generator=gen).to(dtype)
            w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
            dout = torch.randn(M, C, generator=gen).to(dtype)
            got = []
            for fused in (False, True):
                t = [x.clone().requires_grad_(True) for x in (y, g, w, b)]
                if fused:
                    out = norm_gate_triton(*t, H, 64e-5)
                else:  # the model's arithmetic under bf16 autocast: the norm in float32
                    out = F.group_norm(t[0].float(), H, t[2], t[3], 64e-5).to(t[1].dtype) * t[1]
                out.backward(dout)
                assert out.dtype == dtype
                got.append([out.detach()] + [x.grad for x in t])
            for name, a, c in zip(("out", "dy", "dg", "dw", "db"), got[1], got[0]):
                assert a.dtype == c.dtype, name
                assert rel(a, c) <= tol, (dtype, M, name, rel(a, c))

    # Wired into the model: a 2-layer RWKV-6 with every ln_x + gate on the kernels (fp32) equals the
    # reference model in outputs and every parameter's gradient.
    import copy
    from utils import hidden_and_grads, random_rwkv6

    ref = random_rwkv6(n_layer=2, n_embd=128).train()
    fused = copy.deepcopy(ref)
    calls = []

    def fused_fn(y, g, ln):
        calls.append(y.shape)
        return norm_gate_triton(y, g, ln.weight, ln.bias, ln.num_groups, ln.eps)

    for blk in fused.blocks:
        blk.att.norm_gate_fn = fused_fn
    x = torch.randn(2, 45, 128, generator=gen)
    probe = torch.randn(2, 45, 128, generator=gen)
    (h_ref, g_ref), (h_fused, g_fused) = (hidden_and_grads(m, x, probe) for m in (ref, fused))
    assert calls == [(90, 128)] * 2  # every layer went through the kernels
    assert rel(h_fused, h_ref) <= 1e-5
    for name, g in g_ref.items():
        assert rel(g_fused[name], g) <= 1e-4, name

    # Under torch.compile the kernels are custom ops inside the graph: fullgraph=True fails on a graph
    # break; aot_eager traces forward and backward with the ops' fake implementations (dynamic M).
    from visualrwkv.ops.norm_gate import fused_norm_gate_fn
    fn = fused_norm_gate_fn()
    ln = torch.nn.GroupNorm(2, 128, eps=64e-5)
    step = torch.compile(lambda y, g: fn(y * 1.5, g, ln) + 1, backend="aot_eager", fullgraph=True, dynamic=True)
    for M in (37, 70):
        y0, g0 = torch.randn(M, 128, generator=gen), torch.randn(M, 128, generator=gen)
        got = []
        for f in (step, lambda y, g: reference_norm_gate(y * 1.5, g, ln.weight, ln.bias, 2, 64e-5) + 1):
            ln.zero_grad()
            y, g = y0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
            out = f(y, g)
            out.backward(torch.ones_like(out))
            got.append([out.detach(), y.grad, g.grad, ln.weight.grad.clone(), ln.bias.grad.clone()])
        for a, c in zip(*got):
            assert rel(a, c) <= 1e-5
    print("ok")
''')


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter runs the kernels)")
def test_fused_kernels_match_reference_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + sys.path))
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (it compiles for sm_90 without a GPU)")
def test_fused_kernels_compile_for_hopper_without_spills():
    """Ahead-of-time compile of both kernels for sm_90 at the 1.6B shape (bf16 and fp32), through ptxas:
    catches what the interpreter does not (types, layouts, register spills)."""
    from visualrwkv.ops import norm_gate as ng

    fwd, bwd = ng._function().kernels
    consts = {"C": 2048, "N": 64, "H": 32, "BLOCK_M": ng._BLOCK_M}
    for dt in ("bf16", "fp32"):
        ptrs = {k: f"*{dt}" for k in ("Y", "G", "Out", "DOut", "DY", "DG")}
        ptrs.update({k: "*fp32" for k in ("W", "Bias", "Mean", "Rstd", "DW", "DB")})
        ptrs.update({"M": "i32", "eps": "fp32"}, **{k: "constexpr" for k in consts})
        for fn in (fwd, bwd):
            code, report = ptxas_for_hopper(fn, {name: ptrs[name] for name in fn.arg_names}, dict(consts),
                                            ng._NUM_WARPS)
            assert code == 0, report[-2000:]
            assert "0 bytes spill stores" in report, (fn.__name__, dt, report)


def test_reference_backend_is_the_models_arithmetic():
    """norm_gate's reference equals ln_x(y) cast to g's dtype times g, in fp32 and under bf16 autocast."""
    gen = torch.Generator().manual_seed(1)
    ln = nn.GroupNorm(4, 256, eps=64e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(256, generator=gen))
        ln.bias.copy_(torch.randn(256, generator=gen))
    y, g = torch.randn(19, 256, generator=gen), torch.randn(19, 256, generator=gen)
    assert torch.equal(norm_gate(y, g, ln), ln(y) * g)
    assert torch.equal(reference_norm_gate(y, g, ln.weight, ln.bias, 4, ln.eps), ln(y) * g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, gb = y.bfloat16(), g.bfloat16()
        assert torch.equal(norm_gate(yb, gb, ln), ln(yb).to(torch.bfloat16) * gb)


def test_bad_backend_and_cpu_tensors_give_clear_errors():
    ln = nn.GroupNorm(2, 128)
    y = torch.randn(3, 128)
    with pytest.raises(ValueError, match="unknown norm_gate backend"):
        norm_gate(y, y, ln, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        norm_gate(y, y, ln, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_match_reference_on_gpu():
    """bf16 as in training (and fp32): values within one bf16 step of the reference (the norm's fp32
    rounding may differ), gradients to bf16 precision; 11,801 rows of 2048 (32 heads)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-3)):
        M, H, C = 11801, 32, 2048
        y = (torch.randn(M, C, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
        g = torch.randn(M, C, device="cuda", generator=gen).to(dtype)
        w = torch.randn(C, device="cuda", generator=gen)
        b = torch.randn(C, device="cuda", generator=gen)
        dout = torch.randn(M, C, device="cuda", generator=gen).to(dtype)
        ln = nn.GroupNorm(H, C, eps=64e-5).cuda()
        with torch.no_grad():
            ln.weight.copy_(w)
            ln.bias.copy_(b)
        got = []
        for backend in ("reference", "triton"):
            ln.zero_grad()
            yy, gg = y.clone().requires_grad_(True), g.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = norm_gate(yy, gg, ln, backend=backend)
            out.backward(dout)
            got.append([out.detach(), yy.grad, gg.grad, ln.weight.grad.clone(), ln.bias.grad.clone()])
        for name, a, c in zip(("out", "dy", "dg", "dw", "db"), got[1], got[0]):
            assert a.dtype == c.dtype, name
            assert rel(a, c) <= tol, (dtype, name, rel(a, c))
        if dtype == torch.bfloat16:
            # Element by element: the two float32 norms differ by a few float32 ulps of the terms they sum
            # (|xhat * w| + |b|), which can move the bf16 rounding of the norm by one step (up to 2^-7 of
            # it) and then the product's rounding by one more. A dropped or misplaced rounding changes a
            # large share of the elements; ulp-level noise changes about 1e-4 of them.
            xhat = F.group_norm(y.float(), H, None, None, 64e-5)
            n32 = xhat * w + b
            terms = xhat.abs() * w.abs() + b.abs()
            bound = g.float().abs() * (terms * 1e-5 + n32.abs() * 2 ** -7) + got[0][0].float().abs() * 2 ** -7
            diff = (got[1][0].float() - got[0][0].float()).abs()
            assert bool((diff <= bound).all()), float((diff - bound).max())
            same = float((got[1][0] == got[0][0]).float().mean())
            assert same >= 0.99, same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocks_with_fused_norm_gate_train_like_reference_on_gpu():
    """A 2-layer model on the GPU with the fused ln_x + gate gives the reference's outputs and gradients
    (pure-PyTorch WKV backend, so no other kernel differs)."""
    import copy

    from visualrwkv.ops.norm_gate import norm_gate as ng
    from utils import random_rwkv6

    ref = random_rwkv6(n_layer=2, n_embd=128).cuda().train()
    fused = copy.deepcopy(ref)
    for blk in fused.blocks:
        blk.att.norm_gate_fn = lambda y, g, ln: ng(y, g, ln, backend="triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 45, 128, device="cuda", generator=gen)
    probe = torch.randn(2, 45, 128, device="cuda", generator=gen)
    outs = []
    for m in (ref, fused):
        h, _ = m.forward_hidden(x, need_state=False, backend="chunked")
        (h * probe).sum().backward()
        outs.append(h.detach())
    assert rel(outs[1], outs[0]) <= 1e-5
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        if pr.grad is not None:
            assert rel(pf.grad, pr.grad) <= 1e-4, name
