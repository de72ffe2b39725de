"""Time-mix interpolation operator (ops/maa_mix.py): the fused Triton kernels against the PyTorch reference."""
import copy
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from visualrwkv.ops.maa_mix import maa_mix, reference_maa_mix
from utils import outputs_and_grads, ptxas_for_hopper, random_rwkv6, rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (its CPU interpreter runs the kernels)")

# Triton's CPU interpreter (a subprocess: it is chosen when kernels are defined). fp32 agrees to
# rounding; the interpreter casts float32 -> bf16 by truncation where a GPU rounds to nearest, so bf16
# is checked to a few bf16 steps here, and against the GPU's rounding in the GPU test.
_INTERPRETED = textwrap.dedent('''
    import copy, torch
    from visualrwkv.ops.maa_mix import maa_mix_triton, reference_maa_mix, fused_maa_mix_fn
    from utils import hidden_and_grads, outputs_and_grads, random_rwkv6, rel

    gen = torch.Generator().manual_seed(0)
    # Odd row counts: one row block, several, and (1100 rows) more than one slice of the column kernel.
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        for M, C, R in ((37, 64, 32), (130, 128, 32), (1100, 64, 16)):
            x = torch.randn(M, C, generator=gen).to(dtype)
            xx = torch.randn(M, C, generator=gen).to(dtype)
            maa = torch.randn(5, C, generator=gen)
            h = torch.randn(5, M, R, generator=gen).tanh().to(dtype)
            w2 = torch.randn(5, R, C, generator=gen) * 0.1
            dout = torch.randn(5, M, C, generator=gen).to(dtype)
            got = [outputs_and_grads(f, (x, xx, maa, h, w2), dout) for f in (reference_maa_mix, maa_mix_triton)]
            for name, a, c in zip(("out", "dx", "dxx", "dmaa", "dh", "dw2"), got[1], got[0]):
                assert a.dtype == c.dtype and a.shape == c.shape, name
                assert rel(a, c) <= tol, (dtype, M, name, rel(a, c))

    # Wired into a 2-layer RWKV-6 (fp32): outputs and every parameter's gradient equal the reference model.
    ref = random_rwkv6(n_layer=2, n_embd=128).train()
    fused = copy.deepcopy(ref)
    calls = []

    def fused_fn(x, xx, maa, h, w2):
        calls.append(tuple(x.shape))
        return maa_mix_triton(x, xx, maa, h, w2)

    for blk in fused.blocks:
        blk.att.maa_mix_fn = fused_fn
    xin = torch.randn(2, 45, 128, generator=gen)
    probe = torch.randn(2, 45, 128, generator=gen)
    (h_ref, g_ref), (h_fused, g_fused) = (hidden_and_grads(m, xin, probe) for m in (ref, fused))
    assert calls == [(90, 128)] * 2  # every layer went through the kernels
    assert rel(h_fused, h_ref) <= 1e-5
    for name, g in g_ref.items():
        assert rel(g_fused[name], g) <= 1e-5, (name, rel(g_fused[name], g))

    # Under torch.compile the kernels are custom ops inside the graph: fullgraph=True fails on a graph
    # break; aot_eager traces forward and backward with the ops' fake implementations (dynamic M).
    from visualrwkv.ops import maa_mix as mm
    apply = mm._function()  # built outside the traced function, as fused_maa_mix_fn does
    assert fused_maa_mix_fn().__name__ == "fn"
    step = torch.compile(lambda x, xx, maa, h, w2: apply(x * 1.5, xx, maa, h, w2) + 1, backend="aot_eager",
                         fullgraph=True, dynamic=True)
    for M in (37, 70):
        base = [torch.randn(M, 64, generator=gen), torch.randn(M, 64, generator=gen), torch.randn(5, 64, generator=gen),
                torch.randn(5, M, 16, generator=gen), torch.randn(5, 16, 64, generator=gen)]
        dout = torch.ones(5, M, 64)
        got = [outputs_and_grads(f, base, dout)
               for f in (step, lambda x, xx, maa, h, w2: reference_maa_mix(x * 1.5, xx, maa, h, w2) + 1)]
        for a, c in zip(*got):
            assert rel(a, c) <= 1e-6
    print("ok")
''')


@needs_triton
def test_fused_kernels_match_reference_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + sys.path))
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@needs_triton
def test_fused_kernels_compile_for_hopper_without_spills():
    """Ahead-of-time compile of the three kernels for sm_90 at the 1.6B shape (bf16 and fp32), through
    ptxas: catches what the interpreter does not (types, layouts, tensor-core dot shapes), and register
    spills in bf16 beyond a few words (the row-wise backward's 16 x 64 x 4 tile spills 24 bytes and measured
    fastest on an H100; 32 x 64 x 8 spills 1.4 KB and ran 20x slower)."""
    from visualrwkv.ops import maa_mix as mm

    kernels = mm._function().kernels
    for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        for fn, (bm, bc, warps) in zip(kernels, (mm._FWD, mm._BWD_ROWS, mm._BWD_COLS)):
            consts = {"C": 2048, "R": 32, "BLOCK_M": bm, "BLOCK_C": bc, "SPLIT": mm._SPLIT, "PREC": prec}
            ptrs = {k: f"*{dt}" for k in ("X", "XX", "Hm", "W2", "Out", "DOut", "DX", "DXX", "DH")}
            ptrs.update({k: "*fp32" for k in ("MAA", "DW2", "DMAA")})
            ptrs.update({"M": "i32"}, **{k: "constexpr" for k in consts})
            code, report = ptxas_for_hopper(fn, {name: ptrs[name] for name in fn.arg_names},
                                            {k: v for k, v in consts.items() if k in fn.arg_names}, warps)
            assert code == 0, report[-2000:]
            if dt == "bf16":  # the training precision; fp32's full-precision dots on CUDA cores may spill
                spilled = [int(m) for m in re.findall(r"(\d+) bytes spill stores", report)]
                assert spilled and max(spilled) <= 64, (fn.__name__, dt, report)


def test_reference_is_the_time_mix_arithmetic():
    """A block with maa_mix_fn = the reference computes what the inline PyTorch code computes, in fp32
    and under bf16 autocast (outputs and gradients bit for bit)."""
    ref = random_rwkv6(n_layer=2, n_embd=128).train()
    other = copy.deepcopy(ref)
    for blk in other.blocks:
        blk.att.maa_mix_fn = reference_maa_mix
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 19, 128, generator=gen)
    for autocast in (False, True):
        got = []
        for m in (ref, other):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                h, _ = m.forward_hidden(x, need_state=False, backend="chunked")
            h.float().pow(2).sum().backward()
            got.append([h.detach()] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
        assert len(got[0]) == len(got[1])
        assert torch.equal(got[0][0], got[1][0])  # outputs: the same elementwise arithmetic
        for a, c in zip(got[0][1:], got[1][1:]):  # gradients: maa's sums over tokens run in another order
            assert rel(a, c) <= (1e-6 if not autocast else 3e-2), rel(a, c)


def test_bad_backend_and_cpu_tensors_give_clear_errors():
    x = torch.randn(3, 64)
    args = (x, x, torch.zeros(5, 64), torch.zeros(5, 3, 32), torch.zeros(5, 32, 64))
    with pytest.raises(ValueError, match="unknown maa_mix backend"):
        maa_mix(*args, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        maa_mix(*args, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_match_reference_on_gpu():
    """The 1.6B shape (11,801 rows, C 2048, R 32): fp32 to rounding, bf16 within a bf16 step or two of the
    reference under autocast (which rounds after each of its elementwise ops)."""
    from visualrwkv.ops.maa_mix import maa_mix_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    M, C, R = 11801, 2048, 32
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(M, C, device="cuda", generator=gen).to(dtype)
        xx = (torch.randn(M, C, device="cuda", generator=gen) * 0.3).to(dtype)
        maa = torch.rand(5, C, device="cuda", generator=gen)
        h = torch.randn(5, M, R, device="cuda", generator=gen).tanh().to(dtype)
        w2 = torch.randn(5, R, C, device="cuda", generator=gen) * 0.1
        dout = torch.randn(5, M, C, device="cuda", generator=gen).to(dtype)
        got = [outputs_and_grads(f, (x, xx, maa, h, w2), dout) for f in (reference_maa_mix, maa_mix_triton)]
        for name, a, c in zip(("out", "dx", "dxx", "dmaa", "dh", "dw2"), got[1], got[0]):
            assert a.dtype == c.dtype, name
            assert rel(a, c) <= tol, (dtype, name, rel(a, c))
