"""The five token-shift interpolations of RWKV-6's time mixing, as one operator:

    out[i] = x + xx * (maa[i] + h[i] @ w2[i])        i = w, k, v, r, g

x, xx: (M, C) (the input and shift(x) - x); maa: (5, C) (time_maa_w/k/v/r/g); h: (5, M, R) (the tanh of
the first LoRA matmul); w2: (5, R, C) (time_maa_w2). Returns (5, M, C) in x's dtype. Backends, chosen by
an explicit argument:

* ``"reference"``: the PyTorch ops the model has always run (a bmm, then the elementwise mix).
* ``"triton"``: one Triton kernel forward (the rank-R matmul in registers, the mix as its epilogue) and
  two backward (per row block: dx, dxx and dh; per column block: dw2 and dmaa), so the (5, M, C) LoRA
  output and its gradient never go through memory. Roundings follow the reference under bf16 autocast:
  the LoRA output and maa are rounded to x's dtype before the mix, the gradient reaching the LoRA
  (dout * xx) is rounded before its matmuls; sums of the five paths are kept in float32 and rounded once
  (autograd rounds after each of the four additions).

Why: in the compiled 1.6B stage-2 step (H100, ``benchmarks/results/2026-11-27-h100-g``, r22) inductor's
mix kernel takes 7.65 ms and its backward 7.74 ms per step besides the bmm's; the (5, M, C) tensor
(240 MB per layer at 11.8k tokens) is written and read back in both directions. Opt-in
(``bench_train_gpu.py --fused_mix 1``) until measured on a GPU.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

MAA_MIX_BACKENDS = ("reference", "triton")
# (rows, columns, warps) per program of each kernel: tiles that sm_90's ptxas compiles without register
# spills at C 2048, R 32 (tests/test_maa_mix.py checks it; 64 x 64 x 4 spilled in all three). Columns per
# program divide C, so C must be a multiple of 64. The row-wise backward's warps come from
# bench_maa_mix.py --configs on an H100 (2026-11-27, 11.8k rows, forward + backward): 16 x 64 x 4
# 1.10 ms, 16 x 64 x 8 1.43 ms, 32 x 64 x 8 29 ms.
_FWD = (32, 64, 8)
_BWD_ROWS = (16, 64, 4)
_BWD_COLS = (64, 64, 8)
# Row blocks per program of the column-wise backward kernel (its partial sums, one per slice of
# _SPLIT x 64 rows, are added by the caller): 11.8k rows -> 12 slices x 5 x 32 column blocks.
_SPLIT = 16
_BLOCK_C = 64


def maa_mix(x, xx, maa, h, w2, backend: str = "reference") -> torch.Tensor:
    """x, xx: (M, C); maa: (5, C); h: (5, M, R); w2: (5, R, C). Returns (5, M, C) in x's dtype."""
    if backend == "reference":
        return reference_maa_mix(x, xx, maa, h, w2)
    if backend != "triton":
        raise ValueError(f"unknown maa_mix backend {backend!r}; choose one of {', '.join(MAA_MIX_BACKENDS)}")
    if not x.is_cuda:
        raise RuntimeError("the 'triton' maa_mix backend needs CUDA tensors; use backend='reference' on a CPU")
    return maa_mix_triton(x, xx, maa, h, w2)


def reference_maa_mix(x, xx, maa, h, w2) -> torch.Tensor:
    """What the time mixing computes: the bmm in x's dtype (as autocast runs it), then the mix."""
    dt = x.dtype
    m = torch.bmm(h.to(dt), w2.to(dt))  # (5, M, C)
    return x + xx * (maa.to(dt).unsqueeze(1) + m)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision: bf16/fp16 values are exact in tf32 (tensor cores, float32 accumulation, as the
    reference's bmm); float32 activations need full float32 products."""
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def maa_mix_triton(x, xx, maa, h, w2) -> torch.Tensor:
    """The fused kernels on tensors of any device Triton runs on (CUDA, or its CPU interpreter in tests)."""
    return _function()(x, xx, maa, h, w2)


@functools.lru_cache(maxsize=1)
def _function():
    """Build the kernels and their custom ops on first use (triton is imported only here); returns
    ``apply(x, xx, maa, h, w2) -> out``."""
    import triton

    from visualrwkv.ops._maa_mix_kernels import maa_mix_bwd_cols, maa_mix_bwd_rows, maa_mix_fwd

    # Custom ops (as ops/norm_gate.py): opaque nodes inside the compiled block graphs, paired by autograd.
    @torch.library.custom_op("visualrwkv::maa_mix_fwd", mutates_args=())
    def fwd(x: torch.Tensor, xx: torch.Tensor, maa: torch.Tensor, h: torch.Tensor, w2: torch.Tensor
            ) -> torch.Tensor:
        M, C = x.shape
        R = w2.shape[1]
        out = x.new_empty(5, M, C)
        bm, bc, warps = _FWD
        maa_mix_fwd[(triton.cdiv(M, bm), C // bc)](
            x.contiguous(), xx.contiguous(), maa.contiguous(), h.to(x.dtype).contiguous(), w2.to(x.dtype).contiguous(),
            out, M, C=C, R=R, BLOCK_M=bm, BLOCK_C=bc, PREC=_precision(x.dtype), num_warps=warps)
        return out

    @fwd.register_fake
    def _(x, xx, maa, h, w2):
        return x.new_empty(5, *x.shape)

    @torch.library.custom_op("visualrwkv::maa_mix_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, xx: torch.Tensor, maa: torch.Tensor, h: torch.Tensor, w2: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, M, C = dout.shape
        R = w2.shape[1]
        dt = xx.dtype
        dout, xx, maa = dout.contiguous(), xx.contiguous(), maa.contiguous()
        hc, w2c = h.to(dt).contiguous(), w2.to(dt).contiguous()
        dx, dxx = torch.empty_like(xx), torch.empty_like(xx)
        dh = torch.empty(5, M, R, device=xx.device, dtype=dt)
        (rm, rc, rw), (cm, cc, cw) = _BWD_ROWS, _BWD_COLS
        n_split = triton.cdiv(M, cm * _SPLIT)
        dw2 = torch.empty(n_split, 5, R, C, device=xx.device, dtype=torch.float32)  # partial sums per row slice
        dmaa = torch.empty(n_split, 5, C, device=xx.device, dtype=torch.float32)
        prec = _precision(dt)
        maa_mix_bwd_rows[(triton.cdiv(M, rm),)](dout, xx, maa, hc, w2c, dx, dxx, dh, M, C=C, R=R, BLOCK_M=rm,
                                                 BLOCK_C=rc, PREC=prec, num_warps=rw)
        maa_mix_bwd_cols[(5, C // cc, n_split)](dout, xx, hc, dw2, dmaa, M, C=C, R=R, BLOCK_M=cm, BLOCK_C=cc,
                                                SPLIT=_SPLIT, PREC=prec, num_warps=cw)
        return dx, dxx, dmaa.sum(0).to(maa.dtype), dh.to(h.dtype), dw2.sum(0).to(w2.dtype)

    @bwd.register_fake
    def _(dout, xx, maa, h, w2):
        return (torch.empty_like(xx, memory_format=torch.contiguous_format),
                torch.empty_like(xx, memory_format=torch.contiguous_format),
                torch.empty_like(maa, memory_format=torch.contiguous_format),
                torch.empty_like(h, memory_format=torch.contiguous_format),
                torch.empty_like(w2, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        x, xx, maa, h, w2 = inputs
        ctx.save_for_backward(xx, maa, h, w2)

    def backward(ctx, dout):
        xx, maa, h, w2 = ctx.saved_tensors
        return bwd(dout, xx, maa, h, w2)

    fwd.register_autograd(backward, setup_context=setup_context)

    def apply(x, xx, maa, h, w2):
        M, C = x.shape
        R = w2.shape[1]
        if maa.shape != (5, C) or h.shape != (5, M, R) or w2.shape != (5, R, C) or xx.shape != x.shape:
            raise ValueError(f"maa_mix: shapes x {tuple(x.shape)}, xx {tuple(xx.shape)}, maa {tuple(maa.shape)}, "
                             f"h {tuple(h.shape)}, w2 {tuple(w2.shape)} do not fit (M, C), (5, C), (5, M, R), (5, R, C)")
        if C % _BLOCK_C or R < 16 or R & (R - 1):
            raise ValueError(f"maa_mix needs C ({C}) a multiple of {_BLOCK_C} and R ({R}) a power of two >= 16")
        return fwd(x, xx, maa, h, w2)

    apply.kernels = (maa_mix_fwd, maa_mix_bwd_rows, maa_mix_bwd_cols)
    return apply


def fused_maa_mix_fn():
    """``maa_mix(..., backend="triton")`` for code that torch.compile traces (``RWKV6.compile_blocks``):
    the kernels and custom ops are built here, eagerly. CPU tensors, or no triton, take the reference."""
    if importlib.util.find_spec("triton") is None:
        return reference_maa_mix
    apply = _function()

    def fn(x, xx, maa, h, w2):
        return apply(x, xx, maa, h, w2) if x.is_cuda else reference_maa_mix(x, xx, maa, h, w2)

    return fn
