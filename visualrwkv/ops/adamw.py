"""AdamW step of a bf16 weight kept with an fp32 master copy, in one pass over memory.

Under bf16 autocast with fp32 weights every training step casts each weight matrix to bf16 in the
forward (read 4 bytes, write 2 per parameter) and each bf16 weight gradient back to fp32 in the
backward (2 + 4), then AdamW reads the fp32 gradient. With the matrices stored in bf16 and their fp32
masters in the optimizer (``train.optim.MasterAdamW``) those casts disappear: this kernel reads the
bf16 gradient and the fp32 master, moments, and writes master, moments and the bf16 weight (28 bytes
per parameter, as the fused fp32 AdamW). The forward sees the same bf16 weight (the master rounded to
nearest even, as autocast rounds it) and the gradient is the same bf16 matmul output, so the training
arithmetic is that of bf16 autocast over fp32 weights.

Update: torch's fused AdamW (``torch.optim.AdamW(fused=True)``, the optimizer of an fp32-weight run),
in fp32: g = grad / grad_scale; w -= (lr wd) w; m = lerp(m, g, 1 - b1); v = lerp(v, g^2, 1 - b2);
w -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps); weight = bf16(w). On the GPU the Triton
kernel rounds each operation as torch's CUDA kernel does, so a --master_weights 1 run takes the same
steps as the fp32-weight run, to the bit (tests/test_master_weights.py checks it against
``torch._fused_adamw_``).

Backends, chosen by argument: "reference" (torch ops; CPU and any device) and "triton" (one kernel per
tensor, CUDA); "auto" = triton on CUDA when Triton imports, else reference.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

ADAMW_BACKENDS = ("reference", "triton")
_BLOCK = 2048  # elements per program: 8 warps x 32 lanes x 8 values


def bias_corrections(beta1: float, beta2: float, step: int, device: torch.device) -> torch.Tensor:
    """(2,) fp32 [1 - beta1^step, 1 - beta2^step], computed as torch's fused AdamW computes them: fp32 powf
    of the fp32-rounded betas on the parameters' device (the GPU's powf differs from a correctly rounded
    power in the last bit now and then, and 1 - b^t magnifies that). Made by fill and pow kernels, so no
    host-device copy: one per optimizer step is enough for all tensors."""
    betas = torch.full((2,), beta1, dtype=torch.float32, device=device)
    betas[1:].fill_(beta2)
    return 1 - torch.pow(betas, torch.full((2,), float(step), dtype=torch.float32, device=device))


def reference_adamw_master_(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                            weight_decay: float, step: int, grad_scale: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None) -> None:
    """The update in torch ops (all operands of one shape; master / moments fp32, updated in place): the
    formula of torch's AdamW, rounded as eager torch ops round it (its last bits differ from the fused
    kernel; ``bias`` is unused: the corrections are taken in double here)."""
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


def _kernel():
    """The Triton kernel, imported on first use (Triton is optional)."""
    from visualrwkv.ops._adamw_kernels import adamw_master_kernel

    return adamw_master_kernel


def _triton_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
                          grad_scale=None, bias=None) -> None:
    n = param.numel()
    scale = grad_scale if grad_scale is not None else master  # a placeholder pointer when unused
    if bias is None:
        bias = bias_corrections(beta1, beta2, step, param.device)
    # Python floats reach the kernel rounded to fp32 to nearest, as the fused kernel's static_cast<float>.
    _kernel()[(-(-n // _BLOCK),)](param, grad.contiguous(), master, exp_avg, exp_avg_sq, scale, bias, n, lr,
                                  weight_decay, beta1, beta2, eps, HAS_SCALE=grad_scale is not None,
                                  HAS_DECAY=weight_decay != 0, BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "reference"
    if backend not in ADAMW_BACKENDS:
        raise ValueError(f"AdamW backend must be one of auto, {', '.join(ADAMW_BACKENDS)}; got {backend!r}")
    return backend


def adamw_master_(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  step: int, grad_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> None:
    """One AdamW step of ``param`` (any float dtype, usually bf16) from its fp32 ``master`` copy.

    param, grad: (...) in the weight's dtype; master, exp_avg, exp_avg_sq: the same shape in fp32, all
    contiguous and updated in place; step: this step's count (1 for the first); grad_scale: an optional
    0-dim fp32 tensor the gradient is divided by (gradient clipping folded into the step, see
    ``train.optim.clip_grad_norm_in_step_``); bias: ``bias_corrections(beta1, beta2, step, device)``, made
    once per optimizer step and shared by its tensors (made here when not given)."""
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != param.shape or not t.is_contiguous():
            raise ValueError(f"adamw_master_: {name} must be a contiguous fp32 tensor of the weight's shape")
    if not param.is_contiguous() or grad.shape != param.shape:
        raise ValueError("adamw_master_: the weight must be contiguous and its gradient of the same shape")
    kw = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
              step=int(step), grad_scale=grad_scale, bias=bias)
    if resolve_backend(backend, param.device) == "triton":
        _triton_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, **kw)
    else:
        reference_adamw_master_(param, grad, master, exp_avg, exp_avg_sq, **kw)
