"""AdamW step of a bf16 weight kept with an fp32 master copy, in one pass over memory.

Under bf16 autocast with fp32 weights every training step casts each weight matrix to bf16 in the
forward (read 4 bytes, write 2 per parameter) and each bf16 weight gradient back to fp32 in the
backward (2 + 4), then AdamW reads the fp32 gradient. With the matrices stored in bf16 and their fp32
masters in the optimizer (``train.optim.MasterAdamW``) those casts disappear: this kernel reads the
bf16 gradient and the fp32 master, moments, and writes master, moments and the bf16 weight (28 bytes
per parameter, as the fused fp32 AdamW). The forward sees the same bf16 weight (the master rounded to
nearest even, as autocast rounds it) and the gradient is the same bf16 matmul output, so the training
arithmetic is that of bf16 autocast over fp32 weights.

Update (torch's fused AdamW, fp32): g = grad / grad_scale; w *= 1 - lr * wd; m = b1 m + (1 - b1) g;
v = b2 v + (1 - b2) g^2; w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); weight = bf16(w).

Backends, chosen by argument: "reference" (torch ops; CPU and any device) and "triton" (one kernel per
tensor, CUDA); "auto" = triton on CUDA when Triton imports, else reference.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

ADAMW_BACKENDS = ("reference", "triton")
_BLOCK = 2048  # elements per program: 8 warps x 32 lanes x 8 values


def reference_adamw_master_(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                            weight_decay: float, step: int, grad_scale: Optional[torch.Tensor] = None) -> None:
    """The update in torch ops (all operands of one shape; master / moments fp32, updated in place)."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    if weight_decay:
        master.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / ((1.0 - beta2 ** step) ** 0.5)).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1 ** step))
    param.copy_(master)


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def adamw_master_kernel(P, G, W, M, V, S, n, beta1, c1, beta2, c2, eps, decay, neg_step_size, inv_bc2,
                                HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
            # The reference's operations in its order, each rounded as torch's CUDA kernels round it
            # (launched without fp fusion: IEEE division and square root, and a fused multiply-add exactly
            # where torch's a + alpha * b, a + alpha * (b * c) and a + alpha * (b / c) compile to one), so
            # the step equals the reference, and the fp32-weight run, bit for bit (measured on an H100).
            # A last-bit difference moves a bf16 weight by an ulp now and then, and training drifts.
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = tl.div_rn(g, tl.load(S))
            w = tl.load(W + offs, mask=mask, other=0.0) * decay
            m = tl.fma(g, c1, tl.load(M + offs, mask=mask, other=0.0) * beta1)
            v = tl.fma(g * g, c2, tl.load(V + offs, mask=mask, other=0.0) * beta2)
            denom = tl.sqrt_rn(v) * inv_bc2 + eps
            w = tl.fma(tl.div_rn(m, denom), neg_step_size, w)
            tl.store(W + offs, w, mask=mask)
            tl.store(M + offs, m, mask=mask)
            tl.store(V + offs, v, mask=mask)
            tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)

        _KERNEL = adamw_master_kernel
    return _KERNEL


def _triton_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
                          grad_scale=None) -> None:
    n = param.numel()
    scale = grad_scale if grad_scale is not None else master  # a placeholder pointer when unused
    # The scalars as the reference's torch ops get them: Python doubles that reach the kernel rounded to
    # fp32 (Triton passes a float argument as fp32, as torch passes a scalar to an fp32 kernel); torch divides
    # by a Python scalar as a product with its reciprocal, taken in double before that rounding.
    _kernel()[(-(-n // _BLOCK),)](param, grad.contiguous(), master, exp_avg, exp_avg_sq, scale, n, beta1, 1.0 - beta1,
                                  beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay, -lr / (1.0 - beta1 ** step),
                                  1.0 / (1.0 - beta2 ** step) ** 0.5, HAS_SCALE=grad_scale is not None,
                                  BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "reference"
    if backend not in ADAMW_BACKENDS:
        raise ValueError(f"AdamW backend must be one of auto, {', '.join(ADAMW_BACKENDS)}; got {backend!r}")
    return backend


def adamw_master_(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  step: int, grad_scale: Optional[torch.Tensor] = None, backend: str = "auto") -> None:
    """One AdamW step of ``param`` (any float dtype, usually bf16) from its fp32 ``master`` copy.

    param, grad: (...) in the weight's dtype; master, exp_avg, exp_avg_sq: the same shape in fp32, all
    contiguous and updated in place; step: this step's count (1 for the first); grad_scale: an optional
    0-dim fp32 tensor the gradient is divided by (gradient clipping folded into the step, see
    ``train.optim.clip_grad_norm_in_step_``)."""
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != param.shape or not t.is_contiguous():
            raise ValueError(f"adamw_master_: {name} must be a contiguous fp32 tensor of the weight's shape")
    if not param.is_contiguous() or grad.shape != param.shape:
        raise ValueError("adamw_master_: the weight must be contiguous and its gradient of the same shape")
    kw = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
              step=int(step), grad_scale=grad_scale)
    if resolve_backend(backend, param.device) == "triton":
        _triton_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, **kw)
    else:
        reference_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, **kw)
