"""ln_x and the output gate of RWKV-6's time mixing, as one operator:

    out = GroupNorm_H(y).to(g.dtype) * g        y, g: (M, C), H groups of N = C / H channels (one per head)

with the GroupNorm's weight and bias (C,) and eps taken from the block's ``ln_x``. Backends, chosen by
an explicit argument:

* ``"reference"``: the PyTorch ops the model has always run (``nn.GroupNorm``, the cast, the product);
  under bf16 autocast the norm runs in float32. Used everywhere unless a caller asks otherwise.
* ``"triton"``: one fused Triton kernel forward and one backward (CUDA tensors). Forward reads y and g
  once and writes out plus a float32 mean / rstd per (row, head); backward recomputes the normalised
  value from them and writes dy, dg and per-block partial sums of the weight and bias gradients. It
  keeps the reference's roundings: the normalised value is rounded to g's dtype before the product, and
  the gradient reaching the norm is the rounded product dout * g, as autograd computes it.

Why: inside the compiled stage-2 step (1.6B shape, 11.8k tokens, H100) inductor's lowering of
``native_group_norm`` with the product spends 22.8 ms of kernel time per step; these kernels 3.7 ms
(``benchmarks/results/2026-11-27-h100-f``, r15 and r16). ``train --compile 1`` uses them on CUDA
(``--fused_norm_gate 0`` for inductor's); everywhere else the reference runs.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_GATE_BACKENDS = ("reference", "triton")
# Rows per program and warps: a program holds BLOCK_M x N values of one head, 16 per thread. sm_90
# ptxas compiles it without spills (tests/test_norm_gate.py); on the H100 (bench_groupnorm.py, 11,800 x
# 2048, fwd+bwd kernel time) 64x8 took 0.175 ms, 32x8 0.239, 16x4 0.268, 16x8 0.368.
_BLOCK_M = 64
_NUM_WARPS = 8


def norm_gate(y: torch.Tensor, g: torch.Tensor, ln: nn.GroupNorm, backend: str = "reference") -> torch.Tensor:
    """y, g: (M, C); ln: the block's ln_x (GroupNorm with one group per head). Returns (M, C) in g's dtype."""
    if backend == "reference":
        return reference_norm_gate(y, g, ln.weight, ln.bias, ln.num_groups, ln.eps)
    if backend != "triton":
        raise ValueError(f"unknown norm_gate backend {backend!r}; choose one of {', '.join(NORM_GATE_BACKENDS)}")
    if not (y.is_cuda and g.is_cuda):
        raise RuntimeError("the 'triton' norm_gate backend needs CUDA tensors; use backend='reference' on a CPU")
    return norm_gate_triton(y, g, ln.weight, ln.bias, ln.num_groups, ln.eps)


def norm_gate_triton(y, g, weight, bias, num_groups: int, eps: float, block_m: int = _BLOCK_M,
                     num_warps: int = _NUM_WARPS) -> torch.Tensor:
    """The fused kernels on tensors of any device Triton runs on (CUDA, or its CPU interpreter in tests).
    block_m (rows per program) and num_warps are exposed for ``benchmarks/bench_groupnorm.py``."""
    return _function()(y, g, weight, bias, num_groups, eps, block_m, num_warps)


@functools.lru_cache(maxsize=1)
def _function():
    """Build the kernels and their custom ops on first use (triton is imported only here); returns
    ``apply(y, g, weight, bias, num_groups, eps, block_m, num_warps) -> out``."""
    import triton
    import triton.language as tl

    @triton.jit
    def norm_gate_fwd(Y, G, W, Bias, Out, Mean, Rstd, M, eps,
                   C: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr):
        # One program: rows [m0, m0 + BLOCK_M) x the N channels of head h.
        h = tl.program_id(1)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M x C may pass 2^31
        cols = h * N + tl.arange(0, N)
        rmask = rows < M
        offs = rows[:, None] * C + cols[None, :]
        y = tl.load(Y + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        mean = tl.sum(y, axis=1) / N
        d = y - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        w = tl.load(W + cols).to(tl.float32)
        b = tl.load(Bias + cols).to(tl.float32)
        n = (d * rstd[:, None] * w[None, :] + b[None, :]).to(Out.dtype.element_ty).to(tl.float32)
        gv = tl.load(G + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        tl.store(Out + offs, (n * gv).to(Out.dtype.element_ty), mask=rmask[:, None])
        tl.store(Mean + rows * H + h, mean, mask=rmask)
        tl.store(Rstd + rows * H + h, rstd, mask=rmask)

    @triton.jit
    def norm_gate_bwd(DOut, Y, G, W, Bias, Mean, Rstd, DY, DG, DW, DB, M,
                   C: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = h * N + tl.arange(0, N)
        rmask = rows < M
        offs = rows[:, None] * C + cols[None, :]
        y = tl.load(Y + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows * H + h, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows * H + h, mask=rmask, other=0.0)
        xhat = (y - mean[:, None]) * rstd[:, None]  # 0 on rows past M
        w = tl.load(W + cols).to(tl.float32)
        b = tl.load(Bias + cols).to(tl.float32)
        n = (xhat * w[None, :] + b[None, :]).to(DG.dtype.element_ty).to(tl.float32)
        do = tl.load(DOut + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        gv = tl.load(G + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        tl.store(DG + offs, (do * n).to(DG.dtype.element_ty), mask=rmask[:, None])
        dn = (do * gv).to(DG.dtype.element_ty).to(tl.float32)  # the product's gradient, rounded as autograd's
        tl.store(DW + pid * C + cols, tl.sum(dn * xhat, axis=0))
        tl.store(DB + pid * C + cols, tl.sum(dn, axis=0))
        dx = dn * w[None, :]
        c1 = tl.sum(dx * xhat, axis=1) / N
        c2 = tl.sum(dx, axis=1) / N
        dy = (dx - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=rmask[:, None])

    # Custom ops, not an autograd.Function: torch.compile keeps them inside the block's graph as opaque
    # nodes (an autograd.Function around raw kernel launches would need a graph break per layer, each
    # one more compiled region to enter forward and backward), and autograd pairs them.
    @torch.library.custom_op("visualrwkv::norm_gate_fwd", mutates_args=())
    def fwd(y: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
            eps: float, block_m: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M, C = y.shape
        y, g = y.contiguous(), g.contiguous()
        out = torch.empty_like(g)
        mean = torch.empty(M, num_groups, device=y.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        norm_gate_fwd[(triton.cdiv(M, block_m), num_groups)](
            y, g, weight, bias, out, mean, rstd, M, eps, C=C, N=C // num_groups, H=num_groups, BLOCK_M=block_m,
            num_warps=num_warps)
        return out, mean, rstd

    @fwd.register_fake
    def _(y, g, weight, bias, num_groups, eps, block_m, num_warps):
        mean = y.new_empty(y.shape[0], num_groups, dtype=torch.float32)
        return torch.empty_like(g, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)

    @torch.library.custom_op("visualrwkv::norm_gate_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, y: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            mean: torch.Tensor, rstd: torch.Tensor, block_m: int, num_warps: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        M, C = y.shape
        H = mean.shape[1]
        nb = triton.cdiv(M, block_m)
        dy, dg = torch.empty_like(y), torch.empty_like(g)
        dw = torch.empty(nb, C, device=y.device, dtype=torch.float32)  # partial sums per row block
        db = torch.empty_like(dw)
        norm_gate_bwd[(nb, H)](dout.contiguous(), y, g, weight, bias, mean, rstd, dy, dg, dw, db, M,
                               C=C, N=C // H, H=H, BLOCK_M=block_m, num_warps=num_warps)
        return dy, dg, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)

    @bwd.register_fake
    def _(dout, y, g, weight, bias, mean, rstd, block_m, num_warps):
        return (torch.empty_like(y, memory_format=torch.contiguous_format),
                torch.empty_like(g, memory_format=torch.contiguous_format), torch.empty_like(weight),
                torch.empty_like(bias))

    def setup_context(ctx, inputs, output):
        y, g, weight, bias, num_groups, eps, block_m, num_warps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(y.contiguous(), g.contiguous(), weight, bias, mean, rstd)
        ctx.block_m, ctx.num_warps = block_m, num_warps

    def backward(ctx, dout, _dmean, _drstd):
        y, g, weight, bias, mean, rstd = ctx.saved_tensors
        dy, dg, dw, db = bwd(dout, y, g, weight, bias, mean, rstd, ctx.block_m, ctx.num_warps)
        return dy, dg, dw, db, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)

    def apply(y, g, weight, bias, num_groups: int, eps: float, block_m: int = _BLOCK_M, num_warps: int = _NUM_WARPS):
        C = y.shape[-1]
        if C % num_groups or (C // num_groups) & (C // num_groups - 1):
            raise ValueError(f"norm_gate needs C ({C}) = num_groups x a power of two; got {num_groups} groups")
        return fwd(y, g, weight, bias, num_groups, float(eps), block_m, num_warps)[0]

    apply.kernels = (norm_gate_fwd, norm_gate_bwd)  # for ahead-of-time compile checks
    return apply


def fused_norm_gate_fn():
    """``norm_gate(..., backend="triton")`` for code that torch.compile traces (``RWKV6.compile_blocks``):
    the kernels and custom ops are built here, eagerly, so the traced call is the custom op alone.
    CPU tensors, or no triton installed, take the reference (same results)."""
    if importlib.util.find_spec("triton") is None:
        return norm_gate
    apply = _function()

    def fn(y, g, ln):
        if y.is_cuda:
            return apply(y, g, ln.weight, ln.bias, ln.num_groups, ln.eps)
        return reference_norm_gate(y, g, ln.weight, ln.bias, ln.num_groups, ln.eps)

    return fn


def reference_norm_gate(y, g, weight, bias, num_groups: int, eps: float) -> torch.Tensor:
    """The reference backend on plain tensors: what ``ln_x(y).to(g.dtype) * g`` computes."""
    return F.group_norm(y, num_groups, weight, bias, eps).to(g.dtype) * g
